"""Helpers for the merge tests: tiny random Llama models sharing a tokenizer, with every
tensor random (norms too), saved in the Hugging Face format; running ``folk merge``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
