"""Quantization: what each scheme costs in quality and buys in size and speed, one run.

Part 1, quality (the bundled SmolLM2-135M-Instruct): every scheme is made with
``folk quantize``'s library function into a temporary hub, then each entry runs in its own
process (so peak RSS is its own): greedy generation (128-token prompt from wikitext-2,
64 new tokens) for prefill/decode tok/s and peak RSS, then sliding-window perplexity on
wikitext-2 test (the same text for every row; GPTQ calibrates on tinyshakespeare, a
different text). The baseline is the float model in bfloat16. The GGUF rows are our
exported Q8_0 (from the int8 entry) and Q4_0 (from the float model) files read back by
folklm; with ``llama-cpp-python`` installed (``pip install -e ".[bench]"``) llama.cpp scores
the same files on the same token ids and decodes from the same prompt.

Part 2, speed (random weights with TinyLlama-1.1B's dimensions, bf16 2.2 GB: larger than
the CPU's cache, so decode is bound by memory as with real 1B models): decode and prefill
tok/s of bf16 (packed oneDNN linears, folklm's fastest float path), int8 and int4, measured
in interleaved rounds (best of each) so that a busy neighbour slows every variant alike.

    python bench/quantize.py                  # both parts, table, one JSON line at the end
    python bench/quantize.py --skip-speed     # part 1 only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = "wikitext2_raw_test/wiki.test.raw"  # shipped data files (folklm.datasets)
CALIBRATION = "tinyshakespeare/input.txt"
# "+head": the LM head quantized too (by default it stays in bf16; embeddings always do)
SCHEMES = [
    "int8",
    "int8+head",
    "int4-g32",
    "int4-g64",
    "int4-g64+head",
    "int4-g128",
    "nf4",
    "gptq-int4-g32",
    "gptq-int4-g64",
]


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not start from the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_file() -> Path:
    from folklm import datasets

    return datasets.path(CALIBRATION)


def wikitext() -> str:
    from folklm import datasets

    return datasets.read_text(WIKITEXT)


# -- part 1: one process per row -------------------------------------------------------------
def worker_folklm(model: str, dtype: str | None, max_tokens: int) -> dict:
    import torch

    import folklm
    from folklm.engine.generate import Timings, generate
    from folklm.eval.perplexity import perplexity
    from folklm.ops.sampling import SamplingParams

    torch.manual_seed(0)
    llm = folklm.load(model, dtype=dtype)
    text = wikitext()
    ids = llm.tokenizer.encode(text[:20000], add_special_tokens=False)[:128]
    generate(llm.model, llm.tokenizer, [ids], SamplingParams(max_new_tokens=4), [])  # warm-up
    best = None
    for _ in range(2):
        t = Timings()
        generate(
            llm.model,
            llm.tokenizer,
            [ids],
            SamplingParams(max_new_tokens=64, ignore_eos=True),
            [],
            t,
        )
        if best is None or t.decode_tps > best.decode_tps:
            best = t
    rss = peak_rss_mb()
    ppl = perplexity(llm, text=text, max_tokens=max_tokens)
    return {
        "prefill_tps": best.prefill_tps,
        "decode_tps": best.decode_tps,
        "peak_rss_mb": rss,
        "perplexity": ppl["perplexity"],
        "bits_per_byte": ppl["bits_per_byte"],
        "tokens": ppl["tokens"],
        "dtype": str(llm.dtype).removeprefix("torch."),
    }


def worker_llama_cpp(path: str, max_tokens: int) -> dict:
    """llama.cpp on our GGUF: the same token ids, windows and scoring as folklm's perplexity."""
    import math

    import numpy as np
    from llama_cpp import Llama

    # token ids and windows come from the parent: no torch in this process (fair RSS)
    job = json.loads(Path(os.environ["FOLK_BENCH_IDS"]).read_text())
    ids = job["ids"]
    threads = os.cpu_count() or 1
    prompt = ids[:128]
    gen = Llama(path, n_ctx=512, n_threads=threads, verbose=False)
    best = (0.0, 0.0)
    for _ in range(2):
        gen.reset()
        t0 = time.perf_counter()
        gen.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(64):
            token = int(np.argmax(gen.scores[gen.n_tokens - 1]))
            gen.eval([token])
        t2 = time.perf_counter()
        best = max(best, (64 / (t2 - t1), len(prompt) / (t1 - t0)))
    rss = peak_rss_mb()  # while generating (scoring below keeps all logits)
    del gen
    llm = Llama(path, n_ctx=1024, n_batch=1024, logits_all=True, n_threads=threads, verbose=False)
    nll, n = 0.0, 0
    for b, e, first in job["windows"]:
        llm.reset()
        llm.eval(ids[b:e])
        logits = np.asarray(llm.scores[: e - b], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        for pos in range(first, e):
            nll -= logp[pos - 1 - b, ids[pos]]
            n += 1
    return {
        "decode_tps": best[0],
        "prefill_tps": best[1],
        "peak_rss_mb": rss,
        "perplexity": math.exp(nll / n),
        "tokens": n,
    }


def run_worker(kind: str, target: str, dtype: str | None, max_tokens: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--target", target]
    cmd += ["--max-tokens", str(max_tokens)] + (["--dtype", dtype] if dtype else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quality_table(max_tokens: int, schemes: list[str]) -> list[dict]:
    from folklm.errors import FolkError

    home = tempfile.mkdtemp(prefix="folk-bench-quant-")
    os.environ["FOLK_HOME"] = home
    env = {**os.environ, "FOLK_HOME": home}
    from folklm.export import export
    from folklm.hub.defaults import default_model_folder
    from folklm.quant.pipeline import quantize_model

    folder = default_model_folder()
    from folklm.tokenizer import Tokenizer

    ids = Tokenizer.from_folder(folder).encode(
        wikitext()[: max_tokens * 8], add_special_tokens=False
    )
    ids_file = Path(home) / "ids.json"
    from folklm.eval.perplexity import windows

    ids = ids[:max_tokens]
    ids_file.write_text(json.dumps({"ids": ids, "windows": windows(len(ids), 1024, 512)}))
    env["FOLK_BENCH_IDS"] = str(ids_file)
    rows = [{"scheme": "bf16", "size_mb": None, "source": "float model, bfloat16"}]
    rows[0].update(run_worker("folklm", str(folder), "bfloat16", max_tokens, env))
    # the float model's weights in bf16: what a bf16 checkpoint of it would take on disk
    rows[0]["size_mb"] = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2 / 1e6
    for label in schemes:
        row = {"scheme": label}
        scheme = label.removesuffix("+head")
        calib = calibration_file() if scheme.startswith("gptq") else None
        t0 = time.perf_counter()
        try:
            entry = quantize_model(
                None,
                scheme,
                f"bench:{label.replace('+', '-')}",
                calibration=calib,
                keep_head=not label.endswith("+head"),
                progress=False,
            )
        except FolkError as e:
            row["error"] = str(e)
            rows.append(row)
            print(f"{label}: not applicable: {e}", file=sys.stderr)
            continue
        row["quantize_s"] = time.perf_counter() - t0
        row["size_mb"] = entry.size / 1e6
        row.update(run_worker("folklm", entry.name, None, max_tokens, env))
        rows.append(row)
        print(f"{label}: done", file=sys.stderr)
    out = Path(home) / "gguf"
    ggufs = {
        "gguf-q8_0": export("bench:int8", out, "gguf"),  # the int8 codes, re-used exactly
        "gguf-q4_0": export("smollm2-135m-instruct", out, "gguf", dtype="q4_0"),
    }
    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
        print("llama-cpp-python is not installed: no llama.cpp rows", file=sys.stderr)
    for name, path in ggufs.items():
        row = {"scheme": f"{name} (folklm)", "size_mb": path.stat().st_size / 1e6}
        row.update(run_worker("folklm", str(path), "bfloat16", max_tokens, env))
        rows.append(row)
        if have_llama:
            row = {"scheme": f"{name} (llama.cpp)", "size_mb": path.stat().st_size / 1e6}
            row.update(run_worker("llama_cpp", str(path), None, max_tokens, env))
            rows.append(row)
    base = rows[0].get("perplexity")
    for row in rows:
        if base and row.get("perplexity"):
            row["delta_ppl_pct"] = 100 * (row["perplexity"] / base - 1)
    return rows


# -- part 2: speed on a model larger than the cache -------------------------------------------
TINYLLAMA = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def speed_table(rounds: int, schemes: list[str]) -> list[dict]:
    import copy

    import torch

    from folklm.config import ModelConfig
    from folklm.engine.fast import pack_linears
    from folklm.engine.generate import Timings, generate
    from folklm.hub.defaults import default_model_folder
    from folklm.models.registry import build_model
    from folklm.ops.rope import RotaryEmbedding, inv_frequencies
    from folklm.ops.sampling import SamplingParams
    from folklm.quant import quantize
    from folklm.tokenizer import Tokenizer

    config = ModelConfig.from_dict(TINYLLAMA)
    torch.manual_seed(0)
    dense = build_model(config, "meta").to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    for m in dense.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = inv_frequencies(config)
    dense.eval()
    variants = {}
    for scheme in schemes:
        variants[scheme] = quantize(copy.deepcopy(dense), scheme, progress=False)
    variants = {"bf16": pack_linears(dense), **variants}
    tokenizer = Tokenizer.from_folder(default_model_folder())  # decodes the ids, nothing more
    prompt_short = list(range(1000, 1064))
    prompt_long = list(range(1000, 1256))
    best = {k: {"decode_tps": 0.0, "prefill_tps": 0.0} for k in variants}
    for _ in range(rounds):
        for name, model in variants.items():
            t = Timings()
            generate(
                model,
                tokenizer,
                [prompt_short],
                SamplingParams(max_new_tokens=32, ignore_eos=True),
                [],
                t,
            )
            best[name]["decode_tps"] = max(best[name]["decode_tps"], t.decode_tps)
            t = Timings()
            generate(model, tokenizer, [prompt_long], SamplingParams(max_new_tokens=1), [], t)
            best[name]["prefill_tps"] = max(best[name]["prefill_tps"], t.prefill_tps)
    rows = []
    for name, model in variants.items():
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        rows.append({"variant": name, "weights_mb": size / 1e6, **best[name]})
    for row in rows:
        row["decode_vs_bf16"] = row["decode_tps"] / rows[0]["decode_tps"]
        row["prefill_vs_bf16"] = row["prefill_tps"] / rows[0]["prefill_tps"]
    return rows


# -- report ----------------------------------------------------------------------------------
def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=4096, help="wikitext tokens scored")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--speed-schemes", default="int8,int4-g64,int4-g128")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "folklm":
        print(json.dumps(worker_folklm(args.target, args.dtype, args.max_tokens)))
        return
    if args.worker == "llama_cpp":
        print(json.dumps(worker_llama_cpp(args.target, args.max_tokens)))
        return
    result: dict = {"data": WIKITEXT, "max_tokens": args.max_tokens}
    if not args.skip_quality:
        rows = quality_table(args.max_tokens, args.schemes.split(","))
        result["quality"] = rows
        print(
            f"\nDefault model (SmolLM2-135M-Instruct), wikitext-2 test, first "
            f"{args.max_tokens} tokens, context 1024 / stride 512"
        )
        print(
            f"{'scheme':24} {'size MB':>8} {'peak RSS MB':>11} {'decode t/s':>10} "
            f"{'prefill t/s':>11} {'ppl':>8} {'Δppl %':>8}"
        )
        for r in rows:
            if "error" in r:
                print(f"{r['scheme']:24} n/a: {r['error']}")
                continue
            print(
                f"{r['scheme']:24} {fmt(r.get('size_mb'), '8.1f')} "
                f"{fmt(r.get('peak_rss_mb'), '11.0f')} {fmt(r.get('decode_tps'), '10.1f')} "
                f"{fmt(r.get('prefill_tps'), '11.0f')} {fmt(r.get('perplexity'), '8.3f')} "
                f"{fmt(r.get('delta_ppl_pct'), '+8.2f')}"
            )
    if not args.skip_speed:
        rows = speed_table(args.rounds, args.speed_schemes.split(","))
        result["speed"] = rows
        print(
            "\nRandom weights, TinyLlama-1.1B dimensions (bf16 weights 2.2 GB), batch 1, "
            f"best of {args.rounds} interleaved rounds"
        )
        print(
            f"{'variant':10} {'weights MB':>10} {'decode t/s':>10} {'× bf16':>7} "
            f"{'prefill t/s':>11} {'× bf16':>7}"
        )
        for r in rows:
            print(
                f"{r['variant']:10} {r['weights_mb']:10.0f} {r['decode_tps']:10.2f} "
                f"{r['decode_vs_bf16']:7.2f} {r['prefill_tps']:11.1f} {r['prefill_vs_bf16']:7.2f}"
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
