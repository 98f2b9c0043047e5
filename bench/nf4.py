"""NF4 for inference: the cost of converting NF4 to int4 (or int8), and the speed it buys.

NF4 (QLoRA's base format) has no CPU kernel; ``folklm.load`` converts NF4 layers to int8
(``NF4Linear.to_int8``; ``to_int4`` is the smaller, lossier alternative). This bench
measures, on the bundled SmolLM2-135M-Instruct quantized to NF4 in memory:

- quality against the NF4 model itself (each NF4 weight dequantized exactly, float32
  activations): mean KL(P_nf4 || P_converted) per token and top-1 agreement of the next-token
  argmax, over the first ``--tokens`` tokens of wikitext-2 (``bench/data``) in windows of
  ``--context``; candidates int8 (per channel, the one used), int4-g32 (least-squares
  grid per group), int4-g32-minmax (each group's own min/max grid) and int4-g64;
- decode speed, batch 1, greedy, same prompt, rounds interleaved: NF4 dequantized per call
  (before), NF4 converted to int8 at load (now), and models quantized to int4-g32 and int8
  directly (the speed the issue compares against).

    python bench/nf4.py                 # table + one JSON line
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parent / "data" / "wikitext2_test_head.txt.gz"


def text() -> str:
    return gzip.decompress(DATA.read_bytes()).decode("utf-8")


def convert(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """Replace every NF4 layer of ``model`` by its int4-gXX or int8 conversion, in place."""
    from folklm.kernels.base import QuantizedLinear
    from folklm.quant import Int8Linear

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if getattr(child, "scheme", "") != "nf4":
                continue
            if how.startswith("int4-g"):
                g, _, minmax = how.removeprefix("int4-g").partition("-")
                new: QuantizedLinear = child.to_int4(int(g), fit=not minmax)
            else:
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                lin.weight.data = child.dequantize(torch.float32)
                new = Int8Linear.from_linear(lin, torch.bfloat16)
            setattr(module, name, new)
    return model


@torch.inference_mode()
def logits_windows(model, ids: list[int], context: int) -> torch.Tensor:
    out = []
    for i in range(0, len(ids) - context + 1, context):
        x = torch.tensor([ids[i : i + context]])
        out.append(model(x)[0].float())  # (context, vocab)
    return torch.cat(out)


def quality(args) -> list[dict]:
    import copy

    import folklm
    from folklm.quant import quantize

    nf4 = folklm.load(dtype="float32", fast=False)
    quantize(nf4, "nf4", progress=False)
    ids = nf4.tokenizer.encode(text())[: args.tokens]
    ref = logits_windows(nf4.model, ids, args.context)
    logp_ref = F.log_softmax(ref, -1)
    rows = []
    for how in ("int4-g32", "int4-g32-minmax", "int4-g64", "int8"):
        model = convert(copy.deepcopy(nf4.model), how)
        got = logits_windows(model, ids, args.context)
        logp = F.log_softmax(got, -1)
        kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)  # (tokens,)
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append(
            {
                "conversion": how,
                "tokens": ref.shape[0],
                "kl_mean": kl.mean().item(),
                "kl_p99": kl.quantile(0.99).item(),
                "top1_agreement": top1,
            }
        )
    return rows


def speed(args) -> list[dict]:
    import folklm
    from folklm.engine.fast import pack_linears
    from folklm.engine.generate import generate
    from folklm.ops.sampling import SamplingParams
    from folklm.quant import quantize

    variants = {}
    for name in ("nf4 (dequantize per call)", "nf4 -> int8 (load)", "int4-g32", "int8"):
        llm = folklm.load(dtype=args.dtype, fast=False)
        quantize(llm, name if not name.startswith("nf4") else "nf4", progress=False)
        if not name.startswith("nf4 ("):
            pack_linears(llm.model)  # what folklm.load does (converts NF4 there)
        variants[name] = llm
    ids = variants["int4-g32"].tokenizer.encode(text())[:32]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in variants}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, llm in variants.items():
            t = time.perf_counter()
            generate(llm.model, llm.tokenizer, [ids], one, [])
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            generate(llm.model, llm.tokenizer, [ids], params, [])
            total = time.perf_counter() - t
            if r:
                times[name].append((t1, total))
    rows = []
    for name, ts in times.items():
        decode = max((args.new_tokens - 1) / max(total - t1, 1e-9) for t1, total in ts)
        rows.append({"variant": name, "decode_tps": decode})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: folklm's default)")
    args = ap.parse_args()
    from folklm.engine.device import default_dtype
    from folklm.kernels.cpu import cpu_info

    args.dtype = args.dtype or default_dtype()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"CPU: {cpu_info().summary()}; load average before {os.getloadavg()}")
    q = quality(args)
    print(f"\nQuality vs the NF4 model dequantized (float32), wikitext-2, {q[0]['tokens']} tokens")
    print(f"{'conversion':<16} {'KL mean':>9} {'KL p99':>9} {'top-1 agree':>12}")
    for r in q:
        print(
            f"{r['conversion']:<16} {r['kl_mean']:>9.5f} {r['kl_p99']:>9.4f} "
            f"{100 * r['top1_agreement']:>11.2f}%"
        )
    s = speed(args)
    base = next(r["decode_tps"] for r in s if r["variant"] == "int4-g32")
    print(f"\nDecode, batch 1, {args.dtype}, {args.new_tokens} new tokens, best of {args.rounds}")
    print(f"{'variant':<27} {'decode tok/s':>12} {'x int4-g32':>10}")
    for r in s:
        r["vs_int4"] = r["decode_tps"] / base
        print(f"{r['variant']:<27} {r['decode_tps']:>12.1f} {r['vs_int4']:>10.2f}")
    print(f"load average after {os.getloadavg()}")
    print(json.dumps({"cpu": cpu_info().summary(), "dtype": args.dtype, "quality": q, "speed": s}))


if __name__ == "__main__":
    main()
