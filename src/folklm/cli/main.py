"""``folk``: the command line. Each command is a thin wrapper over library functions.

User mistakes (``FolkError``, bad flags) print one line, ``folk: error: ...``, and exit
with status 1 (2 for a bad command line); they never print a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

import click

from folklm.errors import FolkError

if TYPE_CHECKING:  # annotations only: the module itself must not import torch
    from folklm.ops.sampling import SamplingParams


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="folklm")
def app() -> None:
    """folklm: run open-weight language models on your own machine."""


# The sampling flags of run and chat: (SamplingParams field, flag, short, type, default, help).
# Ranges are checked in one place, SamplingParams.validate; a bad value is reported under
# its flag's name.
SAMPLING_FLAGS: list[tuple[str, str, str | None, type, object, str]] = [
    ("max_new_tokens", "--max-tokens", "-n", int, None, "Most tokens to generate."),
    ("temperature", "--temperature", "-t", float, 0.0, "Sampling temperature; 0 = greedy."),
    ("top_k", "--top-k", None, int, 0, "Keep only the k most likely tokens (0 = off)."),
    ("top_p", "--top-p", None, float, 1.0, "Nucleus sampling: smallest set with this mass."),
    ("min_p", "--min-p", None, float, 0.0, "Drop tokens below min-p x the top probability."),
    ("repetition_penalty", "--repetition-penalty", None, float, 1.0, "Penalise seen tokens."),
    (
        "presence_penalty",
        "--presence-penalty",
        None,
        float,
        0.0,
        "OpenAI presence penalty on generated tokens (0 = off).",
    ),
    (
        "frequency_penalty",
        "--frequency-penalty",
        None,
        float,
        0.0,
        "OpenAI frequency penalty on generated tokens (0 = off).",
    ),
    ("seed", "--seed", None, int, None, "Random seed: same seed, same text."),
]


def sampling_options(max_tokens_default: int):
    """The sampling flags shared by run and chat (SAMPLING_FLAGS), plus --dtype and
    --allow-pickle; the command receives the sampling values in ``**sampling``."""

    def wrap(f):
        options = []
        for field, flag, short, kind, default, text in SAMPLING_FLAGS:
            names = [flag, short] if short else [flag]
            if field == "max_new_tokens":
                default = max_tokens_default
            options.append(
                click.option(
                    *names,
                    field,
                    type=kind,
                    default=default,
                    show_default=default is not None,
                    help=text,
                )
            )
        options += [
            click.option(
                "--dtype",
                type=click.Choice(["float32", "bfloat16"]),
                default=None,
                help="Compute dtype. Default: bfloat16 where the CPU has native bf16 "
                "(AVX-512-BF16/AMX), else float32.",
            ),
            click.option(
                "--allow-pickle",
                is_flag=True,
                help="Accept pickled *.bin weights (torch.load with weights_only=True).",
            ),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


def _params(sampling: dict, stop) -> SamplingParams:
    """``SamplingParams`` from the flags, validated; errors name the flag, not the field."""
    # lazy: imports torch; `folk --help` and the hub commands start without it
    from folklm.ops.sampling import SamplingParams

    try:
        return SamplingParams(**sampling, stop=list(stop or [])).validate()
    except FolkError as e:
        message = str(e)
        for field, flag, *_ in SAMPLING_FLAGS:
            if message.startswith(f"{field}="):
                message = f"{flag} {message.removeprefix(field + '=')}"
                break
        raise FolkError(message) from None


@app.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1, required=True, metavar="[MODEL] PROMPT")
@click.option(
    "--chat/--no-chat",
    default=None,
    help="Use the model's chat template (default: when it has one).",
)
@click.option("--system", default=None, help="System message (chat mode).")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object: text, token counts and timings."
)
@sampling_options(256)
def run(
    args,
    chat,
    system,
    stop,
    as_json,
    dtype,
    allow_pickle,
    **sampling,
) -> None:
    """Answer PROMPT with a model, streaming the text as it is generated.

    MODEL is a Hugging Face folder or a .gguf file; without it folklm uses the bundled
    SmolLM2-135M-Instruct. Example: folk run "What is the capital of France?"
    """
    t_start = time.perf_counter()
    if len(args) == 1:
        model_path, prompt = None, args[0]
    elif len(args) == 2:
        model_path, prompt = args
    else:
        raise FolkError(f"expected [MODEL] PROMPT, got {len(args)} arguments")
    if not prompt.strip():
        raise FolkError('empty prompt: give some text, e.g. folk run "What is 2+2?"')
    params = _params(sampling, stop)

    # lazy: imports torch; `folk --help` and the hub commands start without it
    import folklm
    from folklm.engine.generate import Timings

    llm = folklm.load(model_path, dtype=dtype, allow_pickle=allow_pickle)
    use_chat = llm.tokenizer.chat_template is not None if chat is None else chat
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt_ids = llm.tokenizer.encode_chat(messages)
        source = messages
    else:
        prompt_ids = llm.tokenizer.encode(prompt)
        source = prompt
    timings = Timings()
    pieces: list[str] = []
    ttft = None
    for piece in llm.stream(source, params, chat=use_chat, timings=timings):
        if ttft is None:
            ttft = time.perf_counter() - t_start
        pieces.append(piece)
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    text = "".join(pieces)
    if as_json:
        out = {
            "model": llm.source,
            "text": text,
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": timings.generated_tokens,
            "prefill_tokens_per_s": round(timings.prefill_tps, 2),
            "decode_tokens_per_s": round(timings.decode_tps, 2),
            "load_seconds": round(llm.load_seconds, 3),
            "time_to_first_token_s": round(ttft, 3) if ttft is not None else None,
            "process_time_to_first_token_s": _since_process_start(ttft, t_start),
            "dtype": str(llm.dtype).removeprefix("torch."),
            "chat": use_chat,
        }
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        click.secho(
            f"[{len(prompt_ids)} prompt + {timings.generated_tokens} generated tokens · "
            f"prefill {timings.prefill_tps:.0f} tok/s · decode {timings.decode_tps:.1f} tok/s · "
            f"load {llm.load_seconds:.2f}s]",
            dim=True,
            err=True,
        )


def _since_process_start(ttft: float | None, t_start: float) -> float | None:
    """Seconds from the process's creation (interpreter + imports included) to token one."""
    if ttft is None:
        return None
    # lazy: only --timings reads the process's start time
    import psutil

    started = psutil.Process().create_time()
    return round(time.time() - (time.perf_counter() - t_start - ttft) - started, 3)


@app.command()
@click.argument("model", required=False)
@click.option("--system", default=None, help="System message.")
@sampling_options(512)
def chat(
    model,
    system,
    dtype,
    allow_pickle,
    **sampling,
) -> None:
    """Chat with MODEL in the terminal (default: the bundled model).

    The conversation is kept between turns. Type /reset to start over, /exit to quit.
    """
    params = _params(sampling, [])
    # lazy: imports torch; `folk --help` and the hub commands start without it
    import folklm

    llm = folklm.load(model, dtype=dtype, allow_pickle=allow_pickle)
    if llm.tokenizer.chat_template is None:
        raise FolkError(f"{llm.source} has no chat template; use 'folk run --no-chat' instead")
    # lazy: imports torch; `folk --help` and the hub commands start without it
    from folklm.engine.repl import ChatSession

    ChatSession(llm, params, system).run(input_fn=input, write=_write)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# Each command family lives in its own module with a register(app) function.
from folklm.cli import (  # noqa: E402
    eval_cmds,
    hub_cmds,
    merge_cmds,
    pull_cmds,
    quant_cmds,
    serve_cmds,
    tune_cmds,
)

for _commands in (hub_cmds, pull_cmds, quant_cmds, tune_cmds, merge_cmds, eval_cmds, serve_cmds):
    _commands.register(app)


def main() -> None:
    try:
        app.main(prog_name="folk", standalone_mode=False)
    except FolkError as e:
        click.echo(f"folk: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("folk: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        msg = " ".join(e.format_message().split())
        click.echo(f"folk: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
