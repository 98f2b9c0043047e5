"""``folk serve``: the OpenAI-compatible server (``folklm.serve.app``) under uvicorn.

The scalar options are generated from :class:`folklm.serve.config.ServeConfig`'s fields
(name, default, help), and every value is checked by ``ServeConfig.validate`` alone.
"""

from __future__ import annotations

import os
from dataclasses import MISSING

import click

from folklm.serve.config import GIB, ServeConfig, flag_fields, parse_adapter


def _config_options(command):
    """Add one ``--flag`` per flagged ``ServeConfig`` field (types only; no range checks)."""
    for f in reversed(flag_fields()):
        default = None if f.default is MISSING else f.default
        kind = str if f.name in ("host", "dtype") else int
        show = default is not None
        command = click.option(
            "--" + f.name.replace("_", "-"),
            f.name,
            type=kind,
            default=default,
            show_default=show,
            help=f.metadata["help"],
        )(command)
    return command


@click.command("serve")
@click.argument("models", nargs=-1)
@click.option("--api-key", "api_keys", multiple=True,
              help="Require this bearer key (repeatable; visible in `ps`: prefer "
                   "$FOLK_API_KEY or --api-keys-file).")  # fmt: skip
@click.option("--api-keys-file", type=click.Path(dir_okay=False), help="One key per line.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also serve requests whose Host header is NAME when bound to loopback "
                   "(repeatable; others get 403: the DNS-rebinding guard).")  # fmt: skip
@click.option("--kv-cache-gb", type=float, default=ServeConfig.kv_cache_bytes / GIB,
              show_default=True, help="Memory budget of the KV cache.")  # fmt: skip
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=BASE:FOLDER",
              help="Serve a PEFT adapter folder on a served base (repeatable).")  # fmt: skip
@_config_options
def serve(
    models, api_keys, api_keys_file, allowed_hosts, kv_cache_gb, adapters, **settings
) -> None:
    """Serve MODELS (registry names, folders or .gguf files; default: the bundled model)
    over the OpenAI API at http://HOST:PORT/v1, with a web chat at /.

    API keys come from $FOLK_API_KEY (comma-separated), --api-keys-file or --api-key."""
    # lazy: imports torch; `folk --help` and the hub commands start without it
    import uvicorn

    from folklm.serve.app import build_app
    from folklm.serve.auth import read_keys_file

    keys = list(api_keys)
    if api_keys:
        click.echo("warning: --api-key is visible in `ps`; prefer $FOLK_API_KEY", err=True)
    keys += [k.strip() for k in os.environ.get("FOLK_API_KEY", "").split(",") if k.strip()]
    if api_keys_file:
        keys += read_keys_file(api_keys_file)
    config = ServeConfig(
        models=list(models) or [None],
        adapters=dict(parse_adapter(spec) for spec in adapters),
        api_keys=keys,
        allowed_hosts=list(allowed_hosts),
        kv_cache_bytes=int(kv_cache_gb * GIB),
        **settings,
    ).validate()
    if config.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        click.echo(f"warning: serving on {config.host} without an API key", err=True)
    uvicorn.run(build_app(config), host=config.host, port=config.port, log_level="info")


def register(app: click.Group) -> None:
    app.add_command(serve)
