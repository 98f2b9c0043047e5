"""DPO: the loss against a float64 reference from transformers + peft, and a real run."""

from __future__ import annotations

import copy
import gzip
import json

import peft
import pytest
import torch
import torch.nn.functional as F

import folklm
from folklm.checkpoint.peft import AdapterConfig, save_adapter
from folklm.tune.data import PreferenceExample
from folklm.tune.dpo import DPOTask, dpo_terms
from folklm.tune.lora import adapter_state, apply_lora

from .conftest import HH, folk


def _ref_logp(logits: torch.Tensor, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """float64 sum of log p(ids[t]) for t in [start, end), from logits (T, V)."""
    lp = F.log_softmax(logits.double(), dim=-1)
    return sum(lp[t - 1, ids[t]] for t in range(start, end))


def test_dpo_loss_matches_float64_reference(tiny_models, tmp_path):
    hf, folder = tiny_models("llama")
    llm = folklm.load(folder, fast=False, dtype="float32")
    torch.manual_seed(0)
    cfg = AdapterConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    apply_lora(llm.model, cfg)
    for name, p in llm.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(1)
    pairs = [
        PreferenceExample(
            torch.randint(3, 128, (n,), generator=g).tolist(),
            torch.randint(3, 128, (c,), generator=g).tolist(),
            torch.randint(3, 128, (r,), generator=g).tolist(),
        )
        for n, c, r in [(5, 4, 7), (9, 3, 2), (3, 6, 6)]
    ]
    beta = 0.3
    task = DPOTask(beta)
    b = task.collate(pairs)
    losses, margins = dpo_terms(llm.model, b["input_ids"], b["labels"], beta)

    save_adapter(tmp_path / "ad", cfg, adapter_state(llm.model))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ad").eval()
    ref_losses, ref_margins = [], []
    for e in pairs:
        ratio = []
        for ans in (e.chosen_ids, e.rejected_ids):
            ids = torch.tensor(e.prompt_ids + ans)
            span = (len(e.prompt_ids), len(ids))
            with torch.no_grad():
                pol = _ref_logp(pm(ids[None]).logits[0], ids, *span)
                with pm.disable_adapter():
                    ref = _ref_logp(pm(ids[None]).logits[0], ids, *span)
            ratio.append(pol - ref)
        m = ratio[0] - ratio[1]
        ref_margins.append(m)
        ref_losses.append(-F.logsigmoid(beta * m))
    torch.testing.assert_close(margins.double(), torch.stack(ref_margins), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(losses.double(), torch.stack(ref_losses), atol=1e-4, rtol=1e-4)
    assert margins.abs().min() > 1e-2  # the adapter makes a difference


@pytest.mark.slow  # a folk tune DPO run
def test_dpo_run_raises_heldout_margin(tiny_chat, home, tmp_path):
    subset = tmp_path / "hh.jsonl"
    with gzip.open(HH, "rt") as f:
        subset.write_text("".join(next(f) for _ in range(80)))
    r = folk(
        "tune", str(tiny_chat), "--data", str(subset), "--method", "dpo", "--out", "tiny-dpo:v1",
        "--json", "max_seq_len=128", "batch_size=4", "max_steps=8", "lr=1e-2", "warmup_steps=0",
        "eval_max_examples=12", "eval_fraction=0.2", "dpo_beta=0.5", "lora_rank=4",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["data_format"] == "hh-rlhf"
    assert s["eval_before"]["eval_margin"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at start
    # held-out generalisation is shown on the real model (README); a random tiny model
    # only has to report the held-out figures
    assert set(s["eval"]) == {"eval_loss", "eval_margin", "eval_accuracy"}
    show = json.loads(folk("show", "tiny-dpo:v1", "--json").stdout)
    assert show["operation"] == "dpo" and show["recipe"]["dpo_beta"] == 0.5


@pytest.mark.slow  # a DPO training run
def test_dpo_training_raises_the_margin_of_its_pairs(tiny_chat, tmp_path):
    """The optimisation itself: training on 8 HH-RLHF pairs raises their margin."""
    from folklm.tune.data import build_dataset
    from folklm.tune.recipe import Recipe
    from folklm.tune.run import prepare_model
    from folklm.tune.trainer import train

    subset = tmp_path / "hh.jsonl"
    with gzip.open(HH, "rt") as f:
        subset.write_text("".join(next(f) for _ in range(12)))
    llm = folklm.load(tiny_chat, fast=False, dtype="float32")
    recipe = Recipe(method="dpo", max_steps=10, lr=1e-2, warmup_steps=0, batch_size=4,
                    lora_rank=4, dpo_beta=0.5, max_seq_len=192)  # fmt: skip
    pairs = build_dataset(subset, llm.tokenizer, recipe.max_seq_len, preference=True).examples[:8]
    torch.manual_seed(0)
    prepare_model(llm, recipe, None)
    task = DPOTask(recipe.dpo_beta)
    before = task.evaluate(llm.model, pairs)
    result = train(llm.model, recipe, task, pairs, pairs, tmp_path / "run", progress=False)
    assert before["eval_margin"] == pytest.approx(0.0, abs=1e-6)
    assert result.eval["eval_margin"] > 1.0 and result.eval["eval_accuracy"] >= 0.75
    assert result.eval["eval_loss"] < 0.6
