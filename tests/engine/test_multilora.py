"""Per-row LoRA: base and two adapters in one batch give the tokens of each served alone,
and of the adapter fused into the weights (``checkpoint.peft.fused_weight``, float32)."""

from __future__ import annotations

import threading

import pytest
import torch

from folklm.checkpoint.peft import AdapterConfig, LoraWeights, fused_weight, save_adapter
from folklm.engine.generate import generate
from folklm.engine.multilora import MultiLoRA
from folklm.engine.scheduler import Engine, Request
from folklm.errors import FolkError
from folklm.ops.sampling import SamplingParams

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_engine(engine, jobs):
    """jobs: (prompt ids, max tokens, adapter) -> token lists, all submitted at once."""
    out = {i: [] for i in range(len(jobs))}
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(e):
            if e["type"] == "token":
                out[i].append(e["token"])
            elif e["type"] == "finish":
                assert e["finish_reason"] != "error", e
                done.release()

        return sink

    for i, (ids, n, adapter) in enumerate(jobs):
        engine.submit(Request(ids, n, sink_for(i), temperature=0, adapter=adapter))
    for _ in jobs:
        assert done.acquire(timeout=120)
    return [out[i] for i in range(len(jobs))]


def fused_tokens(folder, adapter_dir, ids, n):
    import folklm
    from folklm.checkpoint.peft import load_adapter

    llm = folklm.load(folder, fast=False, dtype="float32")
    adapter = load_adapter(adapter_dir)
    modules = dict(llm.model.named_modules())
    with torch.no_grad():
        for name, w in adapter.layers.items():
            lin = modules[name]
            lin.weight.copy_(fused_weight(lin.weight, w, adapter.config.scaling))
    res = generate(llm.model, llm.tokenizer, [ids], SamplingParams(max_new_tokens=n), [])
    return res[0].token_ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_adapters_and_base_share_a_batch(tiny_models, tmp_path, family, random_adapter):
    import folklm

    _, folder = tiny_models(family)
    llm = folklm.load(
        folder, dtype="float32"
    )  # fast: fused qkv / gate_up packed layers get wrapped
    a1 = random_adapter(tmp_path / "a1", llm.config, 4, ["q_proj", "v_proj"], 1, scale=0.3)
    a2 = random_adapter(tmp_path / "a2", llm.config, 8, ALL_PROJ, 2, scale=0.3)
    lora = MultiLoRA(llm.model, {"a1": a1, "a2": a2}.__getitem__, max_loaded=2)
    engine = Engine(llm, max_batch=6)
    try:
        prompts = [[1, 5, 9, 17, 3], [1, 40, 41, 42], [1, 7, 7, 7, 8, 9, 10]]
        names = [None, "a1", "a2"]
        jobs = [(p, 12, a) for p in prompts for a in names]
        engine.lora = lora
        together = run_engine(engine, jobs)
        alone = [run_engine(engine, [j])[0] for j in jobs]
        assert together == alone
        # the adapters change the output, and match the fused weights
        for k, (p, n, a) in enumerate(jobs):
            if a is None:
                ref = generate(llm.model, llm.tokenizer, [p], SamplingParams(max_new_tokens=n), [])
                assert together[k] == ref[0].token_ids
            else:
                assert together[k] == fused_tokens(folder, {"a1": a1, "a2": a2}[a], p, n)
        assert together[1] != together[0] or together[2] != together[0]
    finally:
        engine.shutdown()


def test_lru_and_bad_adapters(tiny_models, tmp_path, random_adapter):
    import folklm

    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    paths = {
        f"a{i}": random_adapter(tmp_path / f"a{i}", llm.config, 2, ["o_proj"], i) for i in range(3)
    }
    lora = MultiLoRA(llm.model, paths.__getitem__, max_loaded=2)
    assert lora.acquire("a0") == 1 and lora.acquire("a1") == 2
    assert lora.acquire("a2") is None  # both busy
    lora.release("a0")
    assert lora.acquire("a2") == 1 and "a0" not in lora.loaded  # LRU idle one evicted
    dora = AdapterConfig(r=2, lora_alpha=2, target_modules=["o_proj"], use_dora=True)
    w = LoraWeights(torch.zeros(2, 64), torch.zeros(64, 2), torch.ones(64))
    save_adapter(tmp_path / "dora", dora, {"model.layers.0.self_attn.o_proj": w})
    paths["dora"] = tmp_path / "dora"
    with pytest.raises(FolkError, match="DoRA"):
        lora.check("dora")
