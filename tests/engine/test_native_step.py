"""The native decode step (``engine.native_step``) against transformers and the PyTorch path.

Each decode step of a tiny random model (saved with ``save_pretrained``) is compared with
transformers' full forward pass over the same sequence; padded batches, the server's slot
cache, bfloat16 weights and GGUF blocks are compared with folklm's PyTorch path, which the
rest of the suite checks against transformers. A counter on the step shows it really ran.
"""

from __future__ import annotations

import copy

import pytest
import torch

import folklm
from folklm.cache import KVCache
from folklm.engine import native_step
from folklm.engine.runner import ModelRunner
from folklm.engine.slots import SlotCache
from folklm.kernels.gguf_linear import GGUFLinear
from tests.kernels.test_gguf_model import write_tiny_gguf

FAMILIES = ["llama", "llama_tied", "mistral", "qwen2"]
STEPS = 12  # longer than mistral's window of 6 in conftest


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x {scale:.3g}"


def _runner(llm: folklm.LLM) -> tuple[ModelRunner, native_step.NativeStep]:
    step = native_step.for_model(llm.model)
    assert step is not None, "the native step was not enabled at load"
    return ModelRunner(llm.model), step


@pytest.mark.parametrize("family", FAMILIES)
def test_every_step_matches_transformers(tiny_models, family: str) -> None:
    hf, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    runner, step = _runner(llm)
    seq = [5, 17, 3, 99, 42]
    ids, cache = runner.static_cache([seq], len(seq) + STEPS, 0)
    before = step.calls
    with torch.inference_mode():
        logits = runner.run(ids, cache)  # the prompt: PyTorch's prefill
        for _ in range(STEPS):
            seq.append(int(logits.argmax(-1)))
            logits = runner.run(torch.tensor([[seq[-1]]]), cache)
            want = hf(torch.tensor([seq])).logits[0, -1]
            _close(logits[0], want, 1e-4)
    assert step.calls - before == STEPS


def test_yarn_rope_scaling_matches_transformers(tmp_path) -> None:
    """yarn multiplies cos/sin by its attention factor: the step carries it (rope_mult)."""
    import transformers as tf

    from tests.conftest import COMMON, write_tiny_tokenizer

    torch.manual_seed(7)
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, rope_scaling=scaling)).eval()
    hf.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    llm = folklm.load(tmp_path, dtype="float32")
    runner, step = _runner(llm)
    assert step._model.rope_mult != 1.0
    seq = [5, 17, 3]
    ids, cache = runner.static_cache([seq], 3 + 20, 0)
    with torch.inference_mode():
        logits = runner.run(ids, cache)
        for _ in range(20):  # past the original context of 16
            seq.append(int(logits.argmax(-1)))
            logits = runner.run(torch.tensor([[seq[-1]]]), cache)
            _close(logits[0], hf(torch.tensor([seq])).logits[0, -1], 1e-4)


def test_padded_batch_matches_transformers_row_by_row(tiny_models) -> None:
    hf, folder = tiny_models("mistral")  # the window matters once rows pass 6 tokens
    llm = folklm.load(folder, dtype="float32")
    runner, step = _runner(llm)
    rows = [[7, 8, 9], [11, 12, 13, 14, 15, 16, 17]]
    ids, cache = runner.static_cache(rows, 7 + STEPS, 0)
    assert cache.pad is not None
    with torch.inference_mode():
        logits = runner.run(ids, cache)
        for _ in range(STEPS):
            token = logits.argmax(-1)
            for r, t in zip(rows, token.tolist(), strict=True):
                r.append(t)
            logits = runner.run(token[:, None], cache)
            for b, r in enumerate(rows):
                _close(logits[b], hf(torch.tensor([r])).logits[0, -1], 1e-4)
    assert step.calls >= STEPS


def test_slot_cache_rows_at_different_lengths(tiny_models) -> None:
    _, folder = tiny_models("qwen2")
    llm = folklm.load(folder, dtype="float32")
    runner, step = _runner(llm)
    cache = SlotCache(llm.config, max_rows=3, max_len=32, dtype=torch.float32, budget_bytes=1 << 24)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [20, 21, 22, 23]]
    last = []
    with torch.inference_mode():
        for p in prompts:
            got = cache.acquire(p, 32, None, reuse=False)
            assert got is not None
            slot, _ = got
            last.append(int(runner.prefill(p, cache.view(slot)).argmax(-1)))
        rows = [0, 2]  # row 1 is a hole this step
        twin = copy.deepcopy(cache)
        before = step.calls
        fast = runner.decode(rows, [last[0], last[2]], [0, 0], cache.decode_view(rows), 3)
        assert step.calls == before + 1
        runner.native = None  # the PyTorch path on the copied cache
        slow = runner.decode(rows, [last[0], last[2]], [0, 0], twin.decode_view(rows), 3)
    for r in rows:
        _close(fast[r], slow[r], 1e-4)
        assert cache.lengths[r] == twin.lengths[r]
        n = cache.lengths[r]
        for layer in range(llm.config.num_hidden_layers):
            _close(cache.k[layer][r, :, :n], twin.k[layer][r, :, :n], 1e-5)
            _close(cache.v[layer][r, :, :n], twin.v[layer][r, :, :n], 1e-5)


def test_bfloat16_weights_and_cache(tiny_models) -> None:
    hf, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="bfloat16")
    runner, step = _runner(llm)
    assert torch.bfloat16 in step.dtypes
    ref = copy.deepcopy(hf).to(torch.bfloat16).to(torch.float32)  # the same rounded weights
    seq = [5, 17, 3, 99, 42]
    ids, cache = runner.static_cache([seq], len(seq) + 6, 0)
    assert cache.k[0].dtype == torch.bfloat16
    with torch.inference_mode():
        logits = runner.run(ids, cache)
        for _ in range(6):
            seq.append(int(logits.argmax(-1)))
            logits = runner.run(torch.tensor([[seq[-1]]]), cache)
            # bfloat16 keys/values (and the bf16 prefill) round to about 3 significant digits
            _close(logits[0], ref(torch.tensor([seq])).logits[0, -1], 3e-2)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "llama_tied"])
def test_gguf_blocks_match_the_pytorch_path(bpe_models, tmp_path, family: str, qtype: str) -> None:
    path = write_tiny_gguf(bpe_models(family), tmp_path / "m.gguf", qtype)
    llm = folklm.load(path, dtype="float32")
    runner, step = _runner(llm)
    assert any(isinstance(m, GGUFLinear) for m in llm.model.modules())
    ids = torch.tensor([llm.tokenizer.encode("To be, or not to be")])
    cache = KVCache(llm.config, 1, ids.shape[1] + 8, torch.float32)
    with torch.inference_mode():
        token = runner.run(ids, cache).argmax(-1)
        twin = copy.deepcopy(cache)
        for _ in range(8):
            fast = runner.run(token[:, None], cache)
            runner.native = None
            slow = runner.run(token[:, None], twin)
            runner.native = step
            # the same integer kernels; only the order of float operations differs
            _close(fast, slow, 2e-3)
            token = slow.argmax(-1)
    a = llm.generate("To be", max_new_tokens=8, temperature=0, chat=False)
    native_step._STEPS[llm.model] = None
    b = llm.generate("To be", max_new_tokens=8, temperature=0, chat=False)
    assert a.token_ids == b.token_ids


def test_hooks_take_the_pytorch_path(tiny_models) -> None:
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    runner, step = _runner(llm)
    seen = []
    layer = llm.model.model.layers[1]
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    try:
        ids, cache = runner.static_cache([[5, 6, 7]], 8, 0)
        before = step.calls
        with torch.inference_mode():
            token = runner.run(ids, cache).argmax(-1)
            runner.run(token[:, None], cache)
        assert step.calls == before and len(seen) == 2  # prefill and the decode step
    finally:
        handle.remove()


def test_other_families_and_switch_off(tiny_models, monkeypatch) -> None:
    _, folder = tiny_models("mixtral")
    assert native_step.for_model(folklm.load(folder, dtype="float32").model) is None
    _, folder = tiny_models("llama")
    monkeypatch.setenv("FOLK_NATIVE_STEP", "0")
    llm = folklm.load(folder, dtype="float32")
    assert native_step.for_model(llm.model) is None
    out = llm.generate("t5 t6", max_new_tokens=4, temperature=0, chat=False)
    assert len(out.token_ids) == 4


def test_full_cache_is_a_clear_error(tiny_models) -> None:
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    runner, _ = _runner(llm)
    ids, cache = runner.static_cache([[5, 6, 7]], 3, 0)
    with torch.inference_mode():
        token = runner.run(ids, cache).argmax(-1)
        with pytest.raises(folklm.FolkError, match="KV cache full"):
            runner.run(token[:, None], cache)


@pytest.mark.parametrize(
    "scheme,keep_head",
    [("int8", True), ("int8", False), ("int4-g32", True), ("int4-g32", False), ("nf4", True)],
)
def test_folk_quantized_entries(tiny_models, tmp_path, scheme: str, keep_head: bool) -> None:
    from folklm.checkpoint.hf import save_folder
    from folklm.quant import Int4Linear, Int8Linear, quantize, quantized_state_dict

    _, folder = tiny_models("qwen2")
    llm = folklm.load(folder, fast=False, dtype="float32")
    quantize(llm, scheme, keep_embeddings_and_head=keep_head, progress=False)
    out = save_folder(
        tmp_path / "q",
        llm.config,
        quantized_state_dict(llm),
        llm.tokenizer.files(),
        llm.generation_config,
    )
    fast = folklm.load(out, dtype="float32")
    runner, step = _runner(fast)
    kind = Int4Linear if scheme.startswith("int4") else Int8Linear  # nf4 runs as int8
    assert isinstance(fast.model.model.layers[0].mlp.down_proj, kind)
    # the reference: the same grid, multiplied out in float64 by the PyTorch model
    ref_llm = folklm.load(out, dtype="float32", fast=False)
    if scheme == "nf4":
        from folklm.engine.fast import nf4_to_int8

        nf4_to_int8(ref_llm.model)  # what inference runs (its cost: NF4Linear.to_int8)
    ref = ref_llm.model.double()
    # every token goes through the native step, the prompt's too: PyTorch's int8 kernels
    # round the activations to bfloat16 (kernels.choice), which would dominate the error
    seq = [5, 17, 3, 99, 42, 7, 8, 9, 10, 11]
    cache = KVCache(fast.config, 1, len(seq), torch.float32)
    before = step.calls
    with torch.inference_mode():
        for i, t in enumerate(seq):
            logits = runner.run(torch.tensor([[t]]), cache)
            _close(logits[0].double(), ref(torch.tensor([seq[: i + 1]]))[0, -1], 1e-3)
    assert step.calls - before == len(seq)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_relayout_is_exact(group: int) -> None:
    """The Q4_1-like blocks decode to the Int4Linear's own weights (float32 rounding of
    d * q + m against s * (q - 8) + z: a few ulps)."""
    from folklm.kernels import native
    from folklm.quant import Int4Linear

    torch.manual_seed(group)
    layer = Int4Linear.from_linear(torch.nn.Linear(256, 48), group_size=group)
    blocks = native_step.int4_blocks(layer)
    out = torch.empty(48, 256)
    lib = native.kernels()
    assert lib is not None
    rc = lib.lib.folk_dequant_rows(
        native_step._I4_GROUPS,
        blocks.data_ptr(),
        blocks.stride(0),
        256,
        None,
        0,
        48,
        out.data_ptr(),
        1,
    )
    assert rc == 0
    want = layer.dequantize(torch.float64)
    assert (out.double() - want).abs().max().item() <= 4e-7 * want.abs().max().item()


def test_two_threads_decode_at_once(tiny_models) -> None:
    """The C thread pool runs one job at a time; a second caller runs its own job alone."""
    import threading

    _, folder = tiny_models("llama")
    llms = [folklm.load(folder, dtype="float32") for _ in range(2)]
    prompts = ["t5 t6 t7 t8", "t9 t10 t11"]

    def run(i: int) -> list[int]:
        out = llms[i].generate(prompts[i], max_new_tokens=24, temperature=0, chat=False)
        return out.token_ids

    want = [run(0), run(1)]
    got: list = [None, None]

    def work(i: int) -> None:
        for _ in range(5):
            got[i] = run(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("path", [0, 1])  # the vector path, the portable scalar one
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_folklm_row_kernels_within_the_int8_bound(kind: str, path: int, levels: int) -> None:
    """folk_matmul on folklm's int8 rows / re-laid int4 groups against a float64 product of
    the layer's own dequantized weight, within the activation-rounding bound of
    tests/kernels/test_gguf_kernels.py."""
    from folklm.kernels import native
    from folklm.quant import Int4Linear, Int8Linear
    from tests.kernels.test_gguf_kernels import int8_bound

    torch.manual_seed(levels + 2 * path)
    dense = torch.nn.Linear(320, 40)
    if kind == "int8":
        layer = Int8Linear.from_linear(dense, torch.float32)
        blocks, code, scale = layer.qweight, native_step._I8_ROWS, layer.scales.float()
    else:
        layer = Int4Linear.from_linear(dense, group_size=64, dtype=torch.float32)
        blocks, code, scale = native_step.int4_blocks(layer), native_step._I4_GROUPS, None
    w = layer.dequantize(torch.float64)
    x = torch.randn(3, 320)
    y = torch.empty(3, 40)
    lib = native.kernels()
    assert lib is not None
    rc = lib.lib.folk_matmul(
        code,
        blocks.data_ptr(),
        blocks.stride(0),
        40,
        320,
        x.data_ptr(),
        3,
        y.data_ptr(),
        40,
        None,
        levels,
        1,
        path,
    )
    assert rc == 0
    if scale is not None:  # the row scale is the caller's (decode_step.c's lin_group)
        y = y * scale
        bound = int8_bound(w / scale.double()[:, None], x, levels) * scale.double()
    else:
        bound = int8_bound(w, x, levels)
    err = (y.double() - x.double() @ w.t()).abs()
    assert (err <= bound).all(), (err / bound).max()
