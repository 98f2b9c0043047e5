"""``folk quantize`` and ``folk perplexity``: shrink a model, and measure what it cost.

Thin wrappers over :func:`folklm.quant.pipeline.quantize_model` and
:func:`folklm.eval.perplexity.perplexity`; ``FolkError`` becomes ``folk``'s one-line error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from folklm.cli.hub_cmds import _hub_warnings, _print_json, human_bytes
from folklm.errors import FolkError

SCHEME_HELP = (
    "int8 (per output channel), int4-g32/int4-g64/int4-g128 (group-wise asymmetric), nf4 "
    "(QLoRA's NormalFloat, double-quantized), gptq-int4[-g32|-g64|-g128] (calibrated; "
    "needs --calibration)."
)


@click.command("quantize")
@click.argument("model", required=False)
@click.option("--scheme", "-s", required=True, help=SCHEME_HELP)
@click.option("--out", "-o", required=True, help="NAME[:TAG] of the new registry entry.")
@click.option("--calibration", type=click.Path(), help="UTF-8 text file for gptq-int4.")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="Dtype of scales, embeddings and norms (bfloat16 uses the fast int8/int4 kernels).",
)
@click.option(
    "--quantize-head",
    is_flag=True,
    help="Quantize the LM head too (default: keep it in --dtype; embeddings always are).",
)
@click.option(
    "--act-order/--no-act-order",
    default=True,
    show_default=True,
    help="GPTQ: quantize columns in order of decreasing activation (better quality).",
)
@click.option("--license", "license_", help="Licence to declare for the new entry.")
@click.option("--json", "as_json", is_flag=True, help="Print the new entry as JSON.")
def quantize_cmd(
    model: str | None,
    scheme: str,
    out: str,
    calibration: str | None,
    dtype: str,
    quantize_head: bool,
    act_order: bool,
    license_: str | None,
    as_json: bool,
) -> None:
    """Quantize MODEL (registry name, folder or .gguf; default: the bundled model) into a
    new registry entry that records its parent, the scheme and the calibration data."""
    # lazy: imports torch; `folk --help` and the hub commands start without it
    from folklm.quant.gptq import GPTQConfig
    from folklm.quant.pipeline import quantize_model
    from folklm.quant.recipe import QuantizeRecipe

    recipe = QuantizeRecipe(
        scheme,
        calibration=calibration,
        dtype=dtype,
        keep_head=not quantize_head,
        gptq=GPTQConfig(act_order=act_order) if scheme.startswith("gptq") else None,
    )
    with _hub_warnings():
        entry = quantize_model(model, recipe, out, license=license_, progress=not as_json)
    if as_json:
        _print_json(entry.to_dict())
        return
    parents = ", ".join(p["name"] for p in entry.parents) or "-"
    click.echo(
        f"quantized {entry.name}  sha256:{entry.digest[:12]}  {entry.quantization}  "
        f"{human_bytes(entry.size)}  parent {parents}"
    )


@click.command("perplexity")
@click.argument("model", required=False)
@click.option("--data", "-d", required=True, type=click.Path(), help="UTF-8 text file to score.")
@click.option("--max-tokens", type=int, help="Score only the first N tokens of the text.")
@click.option("--context", type=int, default=1024, show_default=True, help="Window length.")
@click.option(
    "--stride", type=int, default=512, show_default=True, help="Tokens between window starts."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default=None,
    help="Compute dtype (default: float32, or the dtype a quantized model was saved in).",
)
@click.option("--batch-size", type=int, default=1, show_default=True, help="Windows per pass.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def perplexity_cmd(
    model: str | None,
    data: str,
    max_tokens: int | None,
    context: int,
    stride: int,
    dtype: str | None,
    batch_size: int,
    as_json: bool,
) -> None:
    """Token-level perplexity (sliding window) and bits per byte of MODEL on a text file."""
    # lazy: imports torch; `folk --help` and the hub commands start without it
    import folklm
    from folklm.eval.perplexity import perplexity
    from folklm.quant.pipeline import read_text

    if max_tokens is not None and max_tokens < 2:
        raise FolkError(f"--max-tokens must be at least 2, got {max_tokens}")
    if context < 2:
        raise FolkError(f"--context must be at least 2, got {context}")
    text = read_text(data, "data file")
    t0 = time.perf_counter()
    llm = folklm.load(model, dtype=dtype)
    result = perplexity(
        llm,
        text=text,
        context=context,
        stride=stride,
        max_tokens=max_tokens,
        batch_size=batch_size,
        progress=not as_json,
    )
    out = {
        "model": model or "default",
        "data": str(Path(data)),
        "perplexity": result["perplexity"],
        "bits_per_byte": result["bits_per_byte"],
        "tokens": result["tokens"],
        "bytes": result["bytes"],
        "context": context,
        "stride": stride,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(
        f"perplexity {out['perplexity']:.4f}  bits/byte {out['bits_per_byte']:.4f}  "
        f"({out['tokens']} tokens, {out['bytes']} bytes, {out['dtype']}, {out['seconds']} s)"
    )


def register(app: click.Group) -> None:
    app.add_command(quantize_cmd)
    app.add_command(perplexity_cmd)
