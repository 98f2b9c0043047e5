"""Cost of constrained decoding on the bundled vocabulary (SmolLM2, 49,152 tokens).

For three schemas -- a 3-property object, a 2,000-value ``enum``, 12 nested type lists --
prints the compile time (with the first mask) and the mean time of one token mask along
40 steps of random logits through the masks. ``--json`` for a machine-readable line.

    PYTHONPATH=src python bench/constrained.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import folklm
from folklm.engine.constrained import GrammarCache, GrammarTokenizer
from folklm.engine.grammar import check_schema

SMALL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
}


def nested(depth: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(depth):
        s = {"type": ["object", "null"], "properties": {"a": s}}
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    llm = folklm.load(dtype="float32")
    eos = llm.eos_token_ids
    t = time.perf_counter()
    cache = GrammarCache(GrammarTokenizer(llm.tokenizer, llm.config.vocab_size, eos))
    out: dict = {"tokenizer_s": time.perf_counter() - t}
    cases = {
        "object": SMALL,
        "enum2000": {"enum": [f"value-{i:05d}" for i in range(2000)]},
        "nested12": nested(12),
    }
    for name, schema in cases.items():
        t = time.perf_counter()
        c = cache.compile("json_schema", check_schema(schema))
        compile_s = time.perf_counter() - t
        g = torch.Generator().manual_seed(0)
        state, times = c.start(), []
        for _ in range(40):
            t = time.perf_counter()
            mask = c.allowed(state)
            times.append(time.perf_counter() - t)
            token = int(torch.randn(c.size, generator=g).masked_fill(~mask, -1e9).argmax())
            state = c.advance(state, token)
            if token in eos or c.done(state):
                break
        out[name] = {"compile_s": compile_s, "mask_ms": 1000 * sum(times) / len(times)}
    if args.json:
        print(json.dumps(out))
        return
    print(f"tokenizer view built in {out.pop('tokenizer_s'):.3f} s")
    for name, r in out.items():
        print(f"{name:<10} compile {r['compile_s'] * 1000:8.1f} ms   mask {r['mask_ms']:7.3f} ms")


if __name__ == "__main__":
    main()
