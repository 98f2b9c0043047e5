"""Helpers for the merge tests: tiny random Llama models sharing a tokenizer, with every
tensor random (norms too), saved in the Hugging Face format; running ``folk merge``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

VOCAB = 128
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)


def write_tiny_tokenizer(folder: Path, vocab_size: int = VOCAB, first: str = "t") -> None:
    """A word-level tokenizer over tokens t0..t{V-1} (``first`` renames them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"{first}{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"{first}0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": f"{first}1", "eos_token": f"{first}2", "pad_token": f"{first}0"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_model(folder: Path, seed: int, tokens: str = "t", **overrides) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**COMMON, **overrides}))
    with torch.no_grad():
        for p in model.parameters():  # random norms too: a merge of all-ones proves nothing
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, first=tokens)
    return folder


def write_yaml(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def folk(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"folk {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def folk_json(*args: str) -> dict:
    out = folk(*args, "--json").stdout
    return json.loads(out)


def write_random_llama(folder: Path, layers: int, seed: int, hidden: int = 1024) -> int:
    """A random float32 Llama model of a few hundred MB, written without building it in
    ``transformers`` (fast); returns its weight bytes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    inter, vocab = hidden * 11 // 4, 8192
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    shapes["lm_head.weight"] = (vocab, hidden)
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        for x in "qkvo":
            shapes[p + f"self_attn.{x}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())
