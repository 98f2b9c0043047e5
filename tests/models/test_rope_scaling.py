"""RoPE scalings against transformers: yarn, longrope (Phi-3), dynamic NTK, linear (Gemma 3's
global layers are covered by the parity tests).

Each case is a tiny random model saved with ``save_pretrained`` whose original context (16) is
shorter than the longest test sequence, so that both sides of the switch are exercised.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import folklm

COMMON = dict(  # as tests/conftest.py's tiny models
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    initializer_range=0.2,
)


def scaled_model(kind: str):
    import transformers as tf

    common = {**COMMON, "max_position_embeddings": 64}
    if kind == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 16}  # fmt: skip
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_parameters=rope))
    if kind == "dynamic":
        rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
        cfg = tf.LlamaConfig(**{**common, "max_position_embeddings": 16}, rope_parameters=rope)
        return tf.LlamaForCausalLM(cfg)
    if kind == "longrope":
        half = COMMON["hidden_size"] // COMMON["num_attention_heads"] // 2
        g = torch.Generator().manual_seed(5)
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": (1 + torch.rand(half, generator=g)).tolist(),
            "long_factor": (1 + 8 * torch.rand(half, generator=g)).tolist(),
            "original_max_position_embeddings": 16,
        }
        cfg = tf.Phi3Config(
            **common, rope_parameters=rope, original_max_position_embeddings=16, pad_token_id=0
        )
        return tf.Phi3ForCausalLM(cfg)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["yarn", "longrope", "dynamic"])
def test_scaled_rope_logits_match_transformers(tiny_models, tmp_path, kind: str) -> None:
    torch.manual_seed(11)
    hf = scaled_model(kind).eval()
    hf.save_pretrained(tmp_path)
    _, tiny = tiny_models("llama")  # its word-level tokenizer (same vocabulary size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, tmp_path / name)
    llm = folklm.load(tmp_path, dtype="float32")
    assert llm.config.rope_type == kind
    for T in (12, 40):  # within and beyond the original context of 16
        ids = torch.randint(3, 128, (2, T))
        with torch.no_grad():
            ref = hf(ids).logits
            ours = llm.model(ids)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=f"{kind}, T={T}")
    # the scaling is not a no-op: the default rotation gives other logits beyond the original
    plain = folklm.load(tmp_path, dtype="float32")
    plain.model.model.rotary_emb.scaling = 1.0
    plain.model.model.rotary_emb.by_length = False
    plain.model.model.rotary_emb.inv_freq = 1.0 / (
        10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    )
    with torch.no_grad():
        assert not torch.allclose(plain.model(ids), ref, atol=1e-3)
