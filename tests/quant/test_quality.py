"""Perplexity of the bundled SmolLM2-135M on wikitext-2 (first 2000 tokens), quantized.

The bundled weights come from a Q4_1 GGUF: every linear is already on a 4-bit grid with
one (scale, min) per 32 inputs, the grid int4-g32 uses. So int4-g32 reproduces them (up to
bfloat16 scales) and is near-lossless here, while int4-g64 has to merge two such grids per
group and loses much more than it would on an original bf16 checkpoint.
"""

from __future__ import annotations

import pytest

from folklm.eval import perplexity
from folklm.quant import quantize

pytestmark = pytest.mark.slow
TOKENS = 2000


@pytest.fixture(scope="module")
def ppl(load_default, wikitext):
    results: dict[str, float] = {}

    def run(scheme: str) -> float:
        if scheme not in results:
            llm = load_default("bfloat16")
            if scheme != "bf16":
                quantize(llm, scheme, progress=False)
            r = perplexity(llm, None, wikitext, context=1024, stride=512, max_tokens=TOKENS)
            results[scheme] = r["perplexity"]
            base = results.get("bf16")
            delta = f" ({100 * (r['perplexity'] / base - 1):+.2f} %)" if base else ""
            print(f"\n{scheme}: ppl {r['perplexity']:.3f}{delta}, bpb {r['bits_per_byte']:.4f}")
        return results[scheme]

    run("bf16")
    return run


def test_int8_costs_at_most_1_percent_perplexity(ppl):
    assert ppl("int8") <= 1.01 * ppl("bf16")


def test_int4_g32_reproduces_the_q4_1_weights(ppl):
    assert abs(ppl("int4-g32") / ppl("bf16") - 1) <= 0.005


@pytest.mark.xfail(
    strict=True,
    reason="target not met: round-to-nearest int4-g64 costs +38 % perplexity on this "
    "Q4_1-derived model (18.53 -> 25.62); gptq-int4-g64 +23 %, with act-order +10 %",
)
def test_int4_g64_costs_at_most_5_percent_perplexity(ppl):
    assert ppl("int4-g64") <= 1.05 * ppl("bf16")
