"""``folk tune`` on bad input: one line, exit 1, nothing run or registered."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import SHAREGPT, folk

BAD = [
    ("nofmt.json", '[{"instruction": "a", "output": "b"},\n{"question": "q"}]', [],
     r"nofmt.json:2: record 2 fits no known format \(keys: question\)"),
    ("empty.jsonl", "\n", [], "the data set is empty"),
    ("role.json", json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                 {"from": "wizard", "value": "yo"}]}]), [],
     "turn 2 has unknown role 'wizard' \\(expected one of: assistant, bard"),
    (None, None, ["target_modules=q_proj,attn"],
     "target module 'attn' does not exist in this model; valid names: down_proj, gate_proj, "
     "k_proj, o_proj, q_proj, up_proj, v_proj"),
    (None, None, ["lora_rank=0"], "lora_rank=0 must be > 0"),
    (None, None, ["lora_rank=-3"], "lora_rank=-3 must be > 0"),
    (None, None, ["max_steps=ten"], "max_steps must be int, got 'ten'"),
    # one process: refused, not silently trained without FSDP
    (None, None, ["method=full", "parallel=fsdp"],
     "parallel='fsdp' is not supported: PyTorch's FSDP needs a GPU"),
]  # fmt: skip


@pytest.mark.parametrize("name,content,overrides,message", BAD, ids=[b[-1][:20] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(
    tiny_chat, home, tmp_path, name, content, overrides, message
):
    data = SHAREGPT
    if name is not None:
        data = tmp_path / name
        data.write_text(content)
    r = folk("tune", str(tiny_chat), "--data", str(data), "--out", "bad:v1", *overrides)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("folk: error: "), r.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in r.stderr
    assert not (home / "runs").exists()
    listing = folk("ls", "--json")
    assert "bad" not in listing.stdout


def test_print_config_shows_defaults_with_overrides():
    r = folk("tune", "--print-config", "--method", "dora", "lora_rank=4", "--json")
    cfg = json.loads(r.stdout)
    assert cfg["method"] == "dora" and cfg["lora_rank"] == 4 and cfg["lr"] == 2e-4
    assert folk("tune", "--print-config").stdout.startswith("method: lora\n")
