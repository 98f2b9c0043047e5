"""``folk serve``: the OpenAI-compatible server (``folklm.serve.app``) under uvicorn."""

from __future__ import annotations

import click

from folklm.errors import FolkError


@click.command("serve")
@click.argument("models", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", "api_keys", multiple=True, help="Require this bearer key (repeatable).")
@click.option("--api-keys-file", type=click.Path(dir_okay=False), help="One key per line.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Most sequences decoding together.")  # fmt: skip
@click.option("--max-queue", type=click.IntRange(0), default=256, show_default=True,
              help="Most requests waiting; beyond it: 429.")  # fmt: skip
@click.option("--max-len", type=click.IntRange(1), default=None,
              help="Most tokens per sequence (default: the model's context).")  # fmt: skip
@click.option("--kv-cache-gb", type=click.FloatRange(0.01), default=4.0, show_default=True,
              help="Memory budget of the KV cache.")  # fmt: skip
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=BASE:FOLDER",
              help="Serve a PEFT adapter folder on a served base (repeatable).")  # fmt: skip
@click.option("--max-adapters", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Adapters resident at once (LRU).")  # fmt: skip
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True)  # fmt: skip
def serve(models, host, port, api_keys, api_keys_file, max_batch, max_queue, max_len,
          kv_cache_gb, adapters, max_adapters, dtype) -> None:  # fmt: skip
    """Serve MODELS (registry names, folders or .gguf files; default: the bundled model)
    over the OpenAI API at http://HOST:PORT/v1, with a web chat at /."""
    # lazy: imports torch; `folk --help` and the hub commands start without it
    import uvicorn

    from folklm.serve.app import ServeConfig, build_app
    from folklm.serve.auth import read_keys_file

    keys = list(api_keys)
    if api_keys_file:
        keys += read_keys_file(api_keys_file)
    adapter_map = {}
    for spec in adapters:
        name, sep, rest = spec.partition("=")
        base, sep2, folder = rest.partition(":")
        if not (sep and sep2 and name and base and folder):
            raise FolkError(f"--adapter {spec!r}: expected NAME=BASE:FOLDER")
        adapter_map[name] = (base, folder)
    config = ServeConfig(
        models=list(models) or [None],
        adapters=adapter_map,
        api_keys=keys,
        max_batch=max_batch,
        max_queue=max_queue,
        max_len=max_len,
        kv_cache_bytes=int(kv_cache_gb * (1 << 30)),
        max_adapters=max_adapters,
        dtype=dtype,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not keys:
        click.echo(f"warning: serving on {host} without an API key", err=True)
    uvicorn.run(build_app(config), host=host, port=port, log_level="info")


def register(app: click.Group) -> None:
    app.add_command(serve)
