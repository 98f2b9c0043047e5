"""ServeConfig: one place validates the server's settings, for Python users and ``folk serve``."""

from __future__ import annotations

from dataclasses import replace

import pytest
from clitest import assert_one_line_error, folk

from folklm.errors import FolkError
from folklm.serve.app import build_app
from folklm.serve.config import ServeConfig, flag_fields, parse_adapter


@pytest.mark.parametrize(
    "change, words",
    [
        ({"max_batch": 0}, "--max-batch 0: must be in 1..1024"),
        ({"max_queue": -1}, "--max-queue -1: must be >= 0"),
        ({"port": 70000}, "--port 70000"),
        ({"max_len": 0}, "--max-len 0"),
        ({"max_adapters": 300}, "--max-adapters 300"),
        ({"dtype": "int3"}, "expected one of: float32, bfloat16"),
        ({"kv_cache_bytes": 10}, "--kv-cache-gb"),
        ({"models": ["a", "b"], "names": ["a"]}, "1 names for 2 models"),
        ({"adapters": {"x": ("base", "")}}, "expected NAME=BASE:FOLDER"),
    ],
)
def test_validate_refuses_each_bad_setting(change, words):
    with pytest.raises(FolkError, match=words.replace("(", r"\(").replace(".", r"\.")):
        replace(ServeConfig(), **change).validate()
    with pytest.raises(FolkError):  # the app refuses it before loading anything
        build_app(replace(ServeConfig(), **change))


def test_defaults_are_valid_and_adapters_parse():
    assert ServeConfig().validate().max_batch == 16
    assert parse_adapter("fr=base:adapters/fr") == ("fr", ("base", "adapters/fr"))
    with pytest.raises(FolkError, match="NAME=BASE:FOLDER"):
        parse_adapter("fr=base")


def test_folk_serve_flags_come_from_the_config():
    help_text = folk("serve", "--help").stdout
    for f in flag_fields():
        assert "--" + f.name.replace("_", "-") in help_text
    assert_one_line_error(folk("serve", "--max-batch", "0"), "--max-batch 0", "1..1024")
    assert_one_line_error(folk("serve", "--dtype", "int3"), "--dtype 'int3'")
