"""Memory-bound decode: tok/s at fp32, bf16, int8, int4 next to the read-bandwidth ceiling.

A decode step of a model much larger than the last-level cache reads every weight once from
DRAM, so its speed is bounded by the read bandwidth: tok/s <= bandwidth / bytes per token.
This bench builds random-weight models (folklm's own Llama code, its quantizers, the
speed-ups ``folklm.load`` applies -- the native decode step, else packed linears -- and its
``generate``), measures the machine's read bandwidth in the same
process and prints the fraction of that ceiling each precision reaches.

Model size: TinyLlama-1.1B dimensions (hidden 2048, MLP 5632, 32 heads / 4 KV heads, 22
layers) when every precision's weights exceed 2x the L3 cache (read from sysfs, else
``lscpu``); otherwise Llama-3-8B per-layer dimensions (hidden 4096, MLP 14336, 32 / 8 heads)
with as many layers as each precision needs to exceed 2x L3, capped by the memory available.
The vocabulary is the bundled model's (49,152; its tokenizer drives ``generate``), the LM
head untied and kept in bf16 for the quantized precisions (as ``folk quantize`` does).

Ceiling: ``torch.sum`` over a float32 buffer of max(4x L3, 1 GiB) (capped by memory), best
of 7, with the same threads as the decode. Decode: batch 1, 8 prompt tokens, ``--new-tokens``
greedy tokens; a 1-new-token call is timed separately and decode = (n - 1) / (total -
prefill); best of ``--rounds``. Each precision runs in its own subprocess.

    python bench/bandwidth.py              # table + one JSON line
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, num_hidden_layers=22)  # fmt: skip
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8)  # fmt: skip
VOCAB = 49152
# bytes per weight of a linear layer, and of the LM head, for each precision
BYTES = {
    "float32": (4.0, 4.0),
    "bfloat16": (2.0, 2.0),
    "int8": (1.0 + 2 / 2048, 2.0),  # codes + a bf16 scale per row (approximate)
    "int4": (0.5 + 4 / 32, 2.0),  # nibbles + bf16 scale and zero per 32 (int4-g32)
}
SCHEME = {"int8": "int8", "int4": "int4-g32"}


def l3_bytes() -> int:
    """The largest unified cache of cpu0 (sysfs), else ``lscpu``'s L3, else 32 MiB."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
            mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1], 1)
            best = max(best, int(size.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    if not best:
        try:
            out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True).stdout
            line = next(ln for ln in out.splitlines() if ln.startswith("L3"))
            best = int(line.split(":")[1].split()[0])
        except (OSError, StopIteration, ValueError):
            best = 32 * 1024**2
    return best


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * 1024**3


def layer_params(d: dict) -> int:
    h, m = d["hidden_size"], d["intermediate_size"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * m


def weight_bytes(d: dict, layers: int, prec: str) -> float:
    lin, head = BYTES[prec]
    return layers * layer_params(d) * lin + VOCAB * d["hidden_size"] * head


def plan(precisions: list[str], l3: int, avail: int) -> tuple[str, dict[str, dict]]:
    """Dimensions and layers per precision: > 2x L3 where memory allows."""
    target = 2 * l3
    if all(weight_bytes(TINYLLAMA, 22, p) > target for p in precisions):
        return "TinyLlama-1.1B", {p: dict(TINYLLAMA) for p in precisions}
    out = {}
    for p in precisions:
        per_layer = layer_params(LLAMA3_8B) * BYTES[p][0]
        head = VOCAB * LLAMA3_8B["hidden_size"] * BYTES[p][1]
        layers = max(1, math.ceil((target * 1.05 - head) / per_layer))
        # the float model built before quantizing: bf16 (2 bytes) or fp32, <= 30 % of memory
        build = 4 if p == "float32" else 2
        cap = int(
            (0.3 * avail - VOCAB * LLAMA3_8B["hidden_size"] * 2 * build)
            / (layer_params(LLAMA3_8B) * build)
        )
        out[p] = dict(LLAMA3_8B, num_hidden_layers=max(1, min(layers, cap)))
    return "Llama-3-8B per-layer", out


def read_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Best-of-N bytes/s of ``torch.sum`` over a float32 buffer of ``nbytes``."""
    import torch

    buf = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best


def worker(args) -> None:
    import torch

    import folklm
    from folklm.config import ModelConfig
    from folklm.engine import native_step
    from folklm.engine.generate import generate
    from folklm.engine.llm import speed_up
    from folklm.models.registry import build_model
    from folklm.ops.rope import RotaryEmbedding, inv_frequencies
    from folklm.ops.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    dims = json.loads(args.dims)
    prec = args.precision
    cfg = ModelConfig.from_dict(
        dict(model_type="llama", vocab_size=VOCAB, max_position_embeddings=4096,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, **dims)
    )  # fmt: skip
    dtype = torch.float32 if prec == "float32" else torch.bfloat16
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype).to_empty(device="cpu")  # meta -> uninitialised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    for m in model.modules():  # non-persistent RoPE tables: computed, as the loader does
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = inv_frequencies(cfg)
    if prec in SCHEME:
        from folklm.quant import quantize

        quantize(model, SCHEME[prec], progress=False)
    model.eval()
    nbytes = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or "embed_tokens" in name or "rotary" in name:
            continue
        nbytes += t.numel() * t.element_size()
    speed_up(model)  # what folklm.load does: the native decode step, else packed linears
    step = native_step.for_model(model)
    if step is not None:  # the bytes the native step reads (int4 is re-laid: 0.75 B/weight)
        nbytes = step.weight_bytes
    tok = folklm.load(args.tokenizer_from, dtype="float32", fast=False).tokenizer
    ids = list(range(100, 108))
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    full = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    generate(model, tok, [ids], one, [])  # warm-up
    ceiling = read_bandwidth(args.buffer_bytes)
    best = 0.0
    for _ in range(args.rounds):
        t = time.perf_counter()
        generate(model, tok, [ids], one, [])
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        generate(model, tok, [ids], full, [])
        total = time.perf_counter() - t
        best = max(best, (args.new_tokens - 1) / max(total - t1, 1e-9))
    ceiling = max(ceiling, read_bandwidth(args.buffer_bytes))
    out = {"bytes_per_token": nbytes, "decode_tps": best, "ceiling_Bps": ceiling}
    print(json.dumps({**out, "step": "native" if step is not None else "torch"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--precisions", default="float32,bfloat16,int8,int4")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--dims", help=argparse.SUPPRESS)
    ap.add_argument("--buffer-bytes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer-from", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.precision:
        return worker(args)
    from folklm.hub.defaults import default_model_folder
    from folklm.kernels.cpu import cpu_info

    precisions = [p for p in args.precisions.split(",") if p]
    l3, avail = l3_bytes(), mem_available()
    kind, dims = plan(precisions, l3, avail)
    buffer_bytes = int(min(max(4 * l3, 1024**3), 0.15 * avail))
    print(f"CPU: {cpu_info().summary()}")
    print(
        f"L3 {l3 / 2**20:.0f} MiB (2x = {2 * l3 / 1e6:.0f} MB); memory available "
        f"{avail / 1e9:.1f} GB; model: {kind} dimensions; bandwidth buffer "
        f"{buffer_bytes / 1e6:.0f} MB; threads {args.threads}; load average before "
        f"{os.getloadavg()}",
        flush=True,
    )
    folder = str(default_model_folder())
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for p in precisions:
        cmd = [sys.executable, __file__, "--precision", p, "--dims", json.dumps(dims[p])]
        cmd += ["--buffer-bytes", str(buffer_bytes), "--tokenizer-from", folder]
        cmd += ["--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds)]
        cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{p}: failed:\n{proc.stderr[-1500:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gbps = r["decode_tps"] * r["bytes_per_token"] / 1e9
        r.update(
            precision=p,
            layers=dims[p]["num_hidden_layers"],
            weights_mb=r["bytes_per_token"] / 1e6,
            above_2x_l3=r["bytes_per_token"] > 2 * l3,
            achieved_GBps=gbps,
            ceiling_GBps=r["ceiling_Bps"] / 1e9,
            fraction_of_ceiling=gbps / (r["ceiling_Bps"] / 1e9),
        )
        rows.append(r)
        print(f"{p}: done; load average {os.getloadavg()}", flush=True)
    print(
        f"\n{'precision':<9} {'layers':>6} {'MB/token':>9} {'>2xL3':>5} {'decode t/s':>10} "
        f"{'GB/s':>6} {'ceiling GB/s':>12} {'fraction':>8} {'step':>6}"
    )
    for r in rows:
        print(
            f"{r['precision']:<9} {r['layers']:>6} {r['weights_mb']:>9.0f} "
            f"{'yes' if r['above_2x_l3'] else 'no':>5} {r['decode_tps']:>10.2f} "
            f"{r['achieved_GBps']:>6.1f} {r['ceiling_GBps']:>12.1f} "
            f"{100 * r['fraction_of_ceiling']:>7.0f}% {r['step']:>6}"
        )
    print(f"load average after {os.getloadavg()}")
    keep = ("precision", "layers", "weights_mb", "decode_tps", "achieved_GBps", "ceiling_GBps",
            "fraction_of_ceiling", "above_2x_l3")  # fmt: skip
    print(
        json.dumps(
            {
                "cpu": cpu_info().summary(),
                "l3_bytes": l3,
                "model": kind,
                "rows": [{k: r[k] for k in keep} for r in rows],
                "fractions": {r["precision"]: round(r["fraction_of_ceiling"], 3) for r in rows},
            }
        )
    )


if __name__ == "__main__":
    main()
