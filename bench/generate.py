"""Generation speed: folklm vs transformers, same model, same prompt, same machine, one run.

Each engine runs in its own subprocess (so peak RSS is its own), loads the same Hugging
Face folder (by default the bundled SmolLM2-135M-Instruct, converted once by folklm), and
generates greedily from a 128-token prompt taken from wikitext-2 for 128 new tokens at
batch size 1, in float32 and bfloat16. Prefill tok/s = prompt tokens / time of the prompt's
forward pass; decode tok/s = new tokens after the first / time of the one-token steps.
Each figure is the median of ``--repeats`` runs after a warm-up.

    python bench/generate.py                 # table + one JSON line at the end
    python bench/generate.py --model DIR     # any Hugging Face folder
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompt_ids(tokenizer_encode, n: int) -> list[int]:
    from folklm import datasets

    text = datasets.read_text("wikitext2_raw_test/wiki.test.raw")[:20000]
    ids = tokenizer_encode(text)
    if len(ids) < n:
        raise SystemExit(f"prompt text too short: {len(ids)} < {n} tokens")
    return ids[:n]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_folklm(model: str, dtype: str, n_prompt: int, n_new: int, repeats: int) -> dict:
    import folklm
    from folklm.engine.generate import Timings, generate
    from folklm.ops.sampling import SamplingParams

    t0 = time.perf_counter()
    llm = folklm.load(model, dtype=dtype)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(lambda t: llm.tokenizer.encode(t, add_special_tokens=False), n_prompt)
    params = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    generate(llm.model, llm.tokenizer, [ids], SamplingParams(max_new_tokens=8), [])  # warm-up
    prefill, decode, tokens = [], [], None
    for _ in range(repeats):
        t = Timings()
        out = generate(llm.model, llm.tokenizer, [ids], params, [], t)
        prefill.append(t.prefill_tps)
        decode.append(t.decode_tps)
        tokens = out[0].token_ids
    return {
        "prefill_tps": statistics.median(prefill),
        "decode_tps": statistics.median(decode),
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": tokens,
    }


def run_transformers(model: str, dtype: str, n_prompt: int, n_new: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
    tok = AutoTokenizer.from_pretrained(model)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(lambda t: tok(t, add_special_tokens=False).input_ids, n_prompt)])
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    prefill, decode, tokens = [], [], None
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=8, **kwargs)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            hf(ids, use_cache=True)
            t_prefill = time.perf_counter() - t
            t = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kwargs)
            t_total = time.perf_counter() - t
            prefill.append(n_prompt / t_prefill)
            decode.append((n_new - 1) / max(t_total - t_prefill, 1e-9))
            tokens = out[0, n_prompt:].tolist()
    return {
        "prefill_tps": statistics.median(prefill),
        "decode_tps": statistics.median(decode),
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": tokens,
    }


def child(args) -> None:
    fn = run_folklm if args.engine == "folklm" else run_transformers
    print(json.dumps(fn(args.model, args.dtype, args.prompt_tokens, args.new_tokens, args.repeats)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="Hugging Face folder (default: the bundled model)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return child(args)
    if args.model is None:
        from folklm.hub.defaults import default_model_folder

        args.model = str(default_model_folder())
    results: dict = {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch_size": 1,
    }
    rows = []
    for dtype in args.dtypes.split(","):
        per = {}
        for engine in ("folklm", "transformers"):
            cmd = [
                sys.executable,
                __file__,
                "--engine",
                engine,
                "--dtype",
                dtype,
                "--model",
                args.model,
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--new-tokens",
                str(args.new_tokens),
                "--repeats",
                str(args.repeats),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{engine} {dtype} failed:\n{proc.stderr[-3000:]}")
            per[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
        f, t = per["folklm"], per["transformers"]
        same = f["tokens"] == t["tokens"]
        results[dtype] = {
            "folklm": {k: round(v, 2) for k, v in f.items() if k != "tokens"},
            "transformers": {k: round(v, 2) for k, v in t.items() if k != "tokens"},
            "decode_ratio_vs_transformers": round(f["decode_tps"] / t["decode_tps"], 2),
            "prefill_ratio_vs_transformers": round(f["prefill_tps"] / t["prefill_tps"], 2),
            "same_greedy_tokens": same,
        }
        for name, r in (("folklm", f), ("transformers", t)):
            rows.append((dtype, name, r["prefill_tps"], r["decode_tps"], r["peak_rss_mb"]))
    header = ("dtype", "engine", "prefill tok/s", "decode tok/s", "peak RSS MB")
    print(f"{header[0]:<9} {header[1]:<13} {header[2]:>13} {header[3]:>12} {header[4]:>11}")
    for dtype, name, p, d, m in rows:
        print(f"{dtype:<9} {name:<13} {p:>13.1f} {d:>12.1f} {m:>11.0f}")
    for dtype in args.dtypes.split(","):
        r = results[dtype]
        print(
            f"{dtype}: decode {r['decode_ratio_vs_transformers']}x, prefill "
            f"{r['prefill_ratio_vs_transformers']}x transformers; same greedy tokens: "
            f"{r['same_greedy_tokens']}"
        )
    dtypes = args.dtypes.split(",")
    best = max(results[d]["folklm"]["decode_tps"] for d in dtypes)
    if "float32" in dtypes:
        results["best_folklm_decode_vs_transformers_float32"] = round(
            best / results["float32"]["transformers"]["decode_tps"], 2
        )
    first = results[dtypes[0]]
    results["decode_ratio_vs_transformers"] = first["decode_ratio_vs_transformers"]
    results["prefill_ratio_vs_transformers"] = first["prefill_ratio_vs_transformers"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
