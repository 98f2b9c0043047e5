"""GGUF files of the newer families, written as llama.cpp's ``convert_hf_to_gguf.py`` writes
them, read by folklm and by transformers (``gguf_file=``).

Each test takes a tiny random transformers model, writes it with ``gguf.GGUFWriter`` using
llama.cpp's architecture name, metadata keys and tensor names (the table below is copied from
gguf-py's ``tensor_mapping.py``, not from folklm), and checks that:

- transformers' own GGUF loader rebuilds the source model's logits (so the file is right);
- folklm's load of the file gives the same logits within 1e-4, and greedy decoding equal to
  the source model's ``generate``, on a sequence longer than the sliding window.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import folklm
from folklm.engine.generate import generate
from folklm.ops.sampling import SamplingParams

# HF name inside model.layers.N -> GGUF name inside blk.N, per architecture (gguf-py's
# TensorNameMap: Gemma's pre/post feed-forward norms are FFN_NORM / FFN_POST_NORM).
SANDWICH = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
LLAMA_LIKE = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
COMMON = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
FUSED = {  # Phi-3 (gguf-py: qkv_proj -> ATTN_QKV, gate_up_proj -> FFN_UP)
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}
OLMO2 = {  # norms after attention and feed-forward only
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
ARCH = {
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "mistral_nemo": "llama",  # llama.cpp writes Mistral as llama (q/k rows permuted)
    "phi3_longrope": "phi3",  # rope_factors_long/short tensors + rope.scaling.attn_factor
    "qwen3_moe": "qwen3moe",  # stacked ffn_*_exps experts, expert_feed_forward_length
}
# transformers' GGUF loader reads these architectures as llama.cpp writes them (it has no
# OLMo 2 support and ignores attention.key_length for llama)
TRANSFORMERS_READS = {"gemma2", "gemma3", "qwen3", "phi3", "qwen3_moe"}
VOCAB = 260


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def tiny(family: str):
    """A tiny random model whose config is what llama.cpp and transformers both assume for
    a GGUF of this architecture (e.g. Gemma 3: head_dim = query_pre_attn_scalar = 256,
    a global layer every 6th, local RoPE base 10k)."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
    )
    if family == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **common,
            num_hidden_layers=6,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=6,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            },
        )
        model = tf.Gemma3ForCausalLM(cfg)
    elif family == "gemma2":  # transformers' GGUF loader: caps 50/30, scalar 256, 2-pattern
        cfg = tf.Gemma2Config(**common, num_hidden_layers=2, head_dim=256, sliding_window=6)
        model = tf.Gemma2ForCausalLM(cfg)
    elif family == "phi3":
        cfg = tf.Phi3Config(**common, num_hidden_layers=2, pad_token_id=0)
        model = tf.Phi3ForCausalLM(cfg)
    elif family == "phi3_longrope":  # 20 test tokens > original 16: the long factors
        half = 16
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": (1 + torch.rand(half)).tolist(),
            "long_factor": (1 + 8 * torch.rand(half)).tolist(),
            "original_max_position_embeddings": 16,
        }
        cfg = tf.Phi3Config(
            **{**common, "max_position_embeddings": 64},
            num_hidden_layers=2,
            pad_token_id=0,
            rope_parameters=rope,
            original_max_position_embeddings=16,
        )
        model = tf.Phi3ForCausalLM(cfg)
    elif family == "qwen3_moe":  # transformers' GGUF loader keeps the default expert width 768
        cfg = tf.Qwen3MoeConfig(
            **common,
            num_hidden_layers=2,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=768,
            norm_topk_prob=True,
        )
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "olmo2":
        cfg = tf.Olmo2Config(**common, num_hidden_layers=2, pad_token_id=0)
        model = tf.Olmo2ForCausalLM(cfg)
    elif family == "mistral_nemo":  # head_dim 48 != 64 / 2
        cfg = tf.MistralConfig(**common, num_hidden_layers=2, head_dim=48)
        model = tf.MistralForCausalLM(cfg)
    elif family == "qwen3":  # transformers' GGUF loader keeps Qwen3Config's head_dim of 128
        cfg = tf.Qwen3Config(**common, num_hidden_layers=2, head_dim=128, rope_theta=1e6)
        model = tf.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # norms too, so that a mix-up cannot hide behind zeros or ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model.eval()


def write_gguf(path: Path, model, family: str) -> None:
    """What convert_hf_to_gguf.py writes (F32), metadata keys by gguf-py's writer."""
    cfg = model.config
    arch = ARCH[family]
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny")
    w.add_license("apache-2.0")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    if family.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
    if family == "phi3_longrope":  # Phi3MiniModel.set_gguf_parameters / generate_extra_tensors
        original = rope["original_max_position_embeddings"]
        scale = cfg.max_position_embeddings / original
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    if family == "gemma2":  # gguf-py: Keys.LLM.ATTN_LOGIT_SOFTCAPPING, FINAL_LOGIT_SOFTCAPPING
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    # a byte-level BPE vocabulary: the 256 byte symbols and four more
    from folklm.checkpoint.gguf_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "he", "Ġt", "<bos>", "<eos>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3, 3])
    w.add_token_merges(["h e", "Ġ t"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_pad_token_id(0)
    if family == "qwen3_moe":  # LLM_KV_EXPERT_* keys; experts stacked per layer
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        # the checkpoint layout (one tensor per expert), not transformers' fused in-memory one
        model.save_pretrained(path.parent / "hf")
        state = load_file(path.parent / "hf" / "model.safetensors")
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}.mlp."
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", state[p + "gate.weight"].float().numpy())
            for hf_kind, g_kind in (
                ("gate_proj", "gate"),
                ("up_proj", "up"),
                ("down_proj", "down"),
            ):
                stack = torch.stack(
                    [state[f"{p}experts.{e}.{hf_kind}.weight"] for e in range(cfg.num_experts)]
                )
                w.add_tensor(f"blk.{i}.ffn_{g_kind}_exps.weight", stack.float().numpy())
    names = {**(SANDWICH if family.startswith("gemma") else LLAMA_LIKE), **COMMON, **FUSED}
    if family == "olmo2":
        names = {**COMMON, **OLMO2}
    for name, p in model.state_dict().items():
        if family == "qwen3_moe" and ".mlp." in name:  # written stacked above
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = p.detach().float().numpy()
        if family.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1  # Gemma's converter stores the scale 1 + w
        if arch == "llama" and "q_proj" in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and "k_proj" in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if name in GLOBAL:
            gname = GLOBAL[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{names[rest]}"
        w.add_tensor(gname, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", list(ARCH))
def test_family_gguf_matches_transformers(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(77)
    hf = tiny(family)
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, hf, family)
    ids = torch.randint(0, VOCAB, (2, 20))  # longer than the window of 6
    with torch.no_grad():
        ref = hf(ids).logits
    assert ref.abs().max() > 1.0
    if family in TRANSFORMERS_READS:  # the file is right: transformers rebuilds the model
        theirs = AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=path.name, dtype=torch.float32
        ).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ref, atol=1e-4, rtol=1e-4)

    llm = folklm.load(path, dtype="float32")
    with torch.no_grad():
        ours = llm.model(ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

    # A longrope generation that crosses the original context makes transformers recompute
    # its whole cache with the long factors (Phi3ForCausalLM.prepare_inputs_for_generation);
    # folklm keeps the cached keys, so that case starts beyond the original context.
    n = 18 if family == "phi3_longrope" else 5
    prompt = ids[0, :n].tolist()
    got = generate(
        llm.model,
        llm.tokenizer,
        [prompt],
        SamplingParams(max_new_tokens=16, ignore_eos=True),
        eos_ids=[],
    )
    want = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, n:].tolist()
    assert got[0].token_ids == want


@pytest.mark.parametrize(
    "model_type, words",
    [
        ("falcon", ["'falcon'"]),
        ("gemma3", ["'gemma3'", "vision tower", "gemma3_text"]),
    ],
)
def test_unsupported_model_type_refused_in_one_line(tmp_path: Path, model_type, words) -> None:
    import json

    from clitest import assert_one_line_error, folk

    hf = tiny("qwen3")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(config))
    supported = "llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma2, gemma3_text, phi3, olmo2"
    assert_one_line_error(folk("run", str(tmp_path), "hello"), *words, supported)
