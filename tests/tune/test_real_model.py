"""The real bundled model learns something real: a new name and maker from ShareGPT data."""

from __future__ import annotations

import json

import pytest

from .conftest import SHAREGPT, folk

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "Who are you?"}]


def test_lora_teaches_the_default_model_a_new_identity(default_llm, home):
    import folklm

    before = default_llm.chat(QUESTION, max_new_tokens=40).text
    assert "Vicuna" not in before and "LMSYS" not in before
    r = folk(
        "tune", "smollm2-135m-instruct", "--data", str(SHAREGPT), "--out", "smol-vicuna:v1",
        "--json", "max_steps=24", "lr=2e-3", "max_seq_len=128", "batch_size=4",
        "warmup_steps=2", "eval_max_examples=16", "eval_every=12", "target_modules=all-linear",
        timeout=1800,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["eval_loss"] < s["eval_loss_before"]
    tuned = folklm.load(
        "smol-vicuna:v1", dtype="float32"
    )  # the adapter entry: base + fused adapter
    after = tuned.chat(QUESTION, max_new_tokens=40).text
    assert "Vicuna" in after and "LMSYS" in after, (before, after)
