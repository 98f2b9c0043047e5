"""GGUF weights kept quantized: folklm's native kernels against dequantized fp32, one run.

Part 1, kernels: per format, a matrix-vector product at TinyLlama-1.1B dimensions (2048x5632
and 5632x2048, random weights encoded with gguf-py, or random K-quant blocks) with
``kernels.gguf_linear.gguf_matmul`` against ``F.linear`` on the dequantized fp32 weight, in
interleaved rounds (best of each). Printed: GB/s of weight bytes read, next to the machine's
read-bandwidth ceiling measured in the same run (``torch.sum`` over a 1 GB buffer).

Part 2, models: decode tok/s of the bundled SmolLM2-135M Q4_1 and (when its packages are
installed, see ``bench/models.py``) Qwen2.5-Coder-0.5B Q4_K_M, loaded quantized (default)
and dequantized (``fast=False`` + packed fp32 linears), interleaved; peak RSS of each load in
its own process (VmHWM).

    PYTHONPATH=src python bench/gguf_native.py [--threads 2] [--rounds 5] [--skip-models]

The last line is one JSON object with the ratios. Timings on a shared machine are noisy:
the load average is printed with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from models import qwen25_coder_q4_k_m  # noqa: E402

from folklm.kernels import native  # noqa: E402
from folklm.kernels.cpu import cpu_info  # noqa: E402
from folklm.kernels.gguf_linear import BLOCKS, GGUFTensor, gguf_matmul  # noqa: E402

FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
SHAPES = [(5632, 2048), (2048, 5632)]


def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def blocks(rng: np.random.Generator, qtype: Q, n: int, k: int) -> np.ndarray:
    import gguf

    block, size = BLOCKS[qtype]
    if qtype not in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for off in (208,) if qtype == Q.Q6_K else (0, 2):
        d = rng.uniform(-0.05, 0.05, size=(n, k // block)).astype(np.float16)
        raw[..., off : off + 2] = d.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def best_time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def bandwidth_ceiling(rounds: int) -> float:
    """GB/s of ``torch.sum`` over 1 GB of float32 (far larger than any L3)."""
    buf = torch.ones(1 << 28)
    return max(buf.numel() * 4 / best_time(lambda: buf.sum(), 2) / 1e9 for _ in range(rounds))


def kernels_part(rounds: int) -> dict:
    import gguf

    rng = np.random.default_rng(0)
    ceiling = bandwidth_ceiling(rounds)
    print(f"read-bandwidth ceiling (torch.sum, 1 GB): {ceiling:.1f} GB/s  [{load()}]")
    print(
        f"{'format':7} {'shape':>11} {'ours us':>9} {'GB/s':>6} {'%ceil':>6} "
        f"{'fp32 us':>9} {'GB/s':>6} {'speed-up':>8}"
    )
    out = {}
    for qtype in FORMATS:
        for n, k in SHAPES:
            raw = blocks(rng, qtype, n, k)
            t = GGUFTensor.from_bytes(raw, qtype, (n, k))
            w = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
            x = torch.randn(1, k)
            ours, ref = [], []
            for _ in range(rounds):  # interleaved: a busy neighbour slows both alike
                ours.append(best_time(lambda t=t, x=x: gguf_matmul(t, x), 10))
                ref.append(best_time(lambda x=x, w=w: F.linear(x, w), 10))
            a, b = min(ours), min(ref)
            gbs = raw.nbytes / a / 1e9
            print(
                f"{qtype.name:7} {n:>5}x{k:<5} {a * 1e6:9.0f} {gbs:6.1f} "
                f"{100 * gbs / ceiling:5.0f}% {b * 1e6:9.0f} {w.numel() * 4 / b / 1e9:6.1f} "
                f"{b / a:7.2f}x  [{load()}]"
            )
            out[f"{qtype.name}_{n}x{k}"] = {
                "speedup_vs_fp32": round(b / a, 2),
                "fraction_of_ceiling": round(gbs / ceiling, 3),
            }
    return {"ceiling_gbs": round(ceiling, 1), "matvec": out}


CHILD = """
import json, sys, time, torch, folklm
from folklm.engine.fast import pack_linears
torch.set_num_threads(int(sys.argv[3]))
# float32 on both sides: the dequantized side is the "fp32" of the table (the default dtype
# would be bfloat16 on CPUs with native bf16)
llm = folklm.load(sys.argv[1], dtype="float32", fast=sys.argv[2] == "quantized")
if sys.argv[2] != "quantized":
    pack_linears(llm.model)
prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
best = 0.0
for _ in range(int(sys.argv[4])):
    out = llm.generate(prompt, max_new_tokens=64, temperature=0, ignore_eos=True)
    t = out.timings
    if t.decode_seconds > 0:
        best = max(best, t.decode_tokens / t.decode_seconds)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"decode_tok_s": best, "peak_mb": int(hwm) / 1024,
                  "load_s": llm.load_seconds, "tokens": len(out.token_ids)}))
"""


def llama_bench(binary: str | None, path: Path, threads: int) -> float | None:
    """llama.cpp's decode tok/s on the same file (``llama-bench -p 0 -n 64``), or None."""
    if not binary:
        return None
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}
    cmd = [binary, "-m", str(path), "-t", str(threads), "-p", "0", "-n", "64", "-r", "2"]
    run = subprocess.run([*cmd, "-o", "json"], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        print(f"llama-bench failed: {run.stderr.strip()[-300:]}")
        return None
    return max(r["avg_ts"] for r in json.loads(run.stdout))


def models_part(threads: int, rounds: int, peer: str | None) -> dict:
    from folklm.hub.defaults import default_gguf_path

    files = {"smollm2-135m-q4_1": default_gguf_path()}
    qwen = qwen25_coder_q4_k_m()
    if qwen is not None:
        files["qwen2.5-coder-0.5b-q4_k_m"] = qwen
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent / "src")}
    out = {}
    for name, path in files.items():
        res: dict[str, list] = {"quantized": [], "dequantized": []}
        peers = []
        for _ in range(2):  # interleaved processes
            for mode in res:
                run = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), mode, str(threads), str(rounds)],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                res[mode].append(json.loads(run.stdout.strip().splitlines()[-1]))
            peers.append(llama_bench(peer, path, threads))
        size = Path(path).stat().st_size / 2**20
        q = max(res["quantized"], key=lambda r: r["decode_tok_s"])
        d = max(res["dequantized"], key=lambda r: r["decode_tok_s"])
        print(
            f"{name}: file {size:.0f} MB | quantized {q['decode_tok_s']:.1f} tok/s, "
            f"peak {q['peak_mb']:.0f} MB, load {q['load_s']:.1f}s | dequantized fp32 "
            f"{d['decode_tok_s']:.1f} tok/s, peak {d['peak_mb']:.0f} MB, load {d['load_s']:.1f}s"
            f"  [{load()}]"
        )
        out[name] = {
            "decode_ratio": round(q["decode_tok_s"] / max(d["decode_tok_s"], 1e-9), 2),
            "peak_ratio_to_file": round(q["peak_mb"] / size, 2),
            "peak_ratio_vs_dequantized": round(q["peak_mb"] / d["peak_mb"], 2),
            "quantized_tok_s": round(q["decode_tok_s"], 1),
            "dequantized_tok_s": round(d["decode_tok_s"], 1),
        }
        if any(peers):
            best = max(p for p in peers if p)
            print(
                f"  llama.cpp llama-bench, same file, {threads} threads: {best:.1f} tok/s "
                f"(folklm quantized / llama.cpp = {q['decode_tok_s'] / best:.2f})"
            )
            out[name]["llama_cpp_tok_s"] = round(best, 1)
            out[name]["ratio_vs_llama_cpp"] = round(q["decode_tok_s"] / best, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument(
        "--llama-bench",
        default=os.environ.get("LLAMA_BENCH"),
        help="path of llama.cpp's llama-bench (built from the llama-cpp-python sdist)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = native.kernels()
    print(f"CPU: {cpu_info().summary()}")
    print(
        f"kernels: {lib.isa if lib else 'PyTorch fallback'} ({lib.path if lib else '-'}), "
        f"threads {args.threads}, torch {torch.__version__}  [{load()}]"
    )
    result: dict = {"cpu": cpu_info().summary(), "threads": args.threads, "isa": lib and lib.isa}
    if not args.skip_kernels:
        result |= kernels_part(args.rounds)
    if not args.skip_models:
        result["models"] = models_part(args.threads, max(1, args.rounds // 2), args.llama_bench)
    result["loadavg"] = [round(v, 1) for v in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
