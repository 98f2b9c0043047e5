"""Generation speed, side by side in one run: folklm, transformers and llama.cpp.

The same weights at each precision, batch 1, a 128-token wikitext-2 prompt (``bench/data``),
128 new tokens, greedy, the same number of threads everywhere:

- ``float32`` / ``bfloat16``: folklm and transformers load the same Hugging Face folder (by
  default the bundled SmolLM2-135M-Instruct as folklm converts it); llama.cpp runs GGUF files
  that ``folk export --format gguf --dtype f32|bf16|f16`` writes from it.
- ``int8`` / ``int4``: folklm runs entries made by ``folk quantize --scheme int8|int4-g32``;
  llama.cpp runs their ``folk export`` (Q8_0 carries the int8 codes exactly; Q4_0 is
  symmetric, so the int4-g32 grid is re-rounded into it). folklm also runs those GGUF
  files through ``folklm.load(file.gguf)``, which uses GGUF-native kernels where this
  install has them and otherwise dequantizes at load (the "linears" column says which).

Timing, identical on the Python engines: each engine lives in its own subprocess (its peak
RSS is its own, VmHWM); the model loads before any timer; one warm-up call; then per round
``time.perf_counter()`` around a 1-new-token call (= prefill) and around a 128-new-token call
(= total); prefill tok/s = 128 / prefill, decode tok/s = 127 / (total - prefill). Both sides
get the same token ids; transformers computes the LM head for the last position only
(``logits_to_keep=1``). Rounds are interleaved across the engines of one precision, in an
order that rotates every round (the first call after another engine's run finds cold
caches and sleeping threads, and costs up to 3x; no engine should always pay it); the
median round is reported. llama.cpp is timed by its own ``llama-bench -t THREADS -p 128 -n
128 -r 1`` (one process per round; it uses its own token ids and decodes from an empty
cache, a slightly easier test). Cold start: ``folk run --json`` on the default model.

    python bench/generate.py                       # table, ratios, one JSON line at the end
    python bench/generate.py --precisions bfloat16,int8 --rounds 5
    LLAMA_BENCH=/path/to/llama-bench python bench/generate.py
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "wikitext2_test_head.txt.gz"
PRECISIONS = ("float32", "bfloat16", "int8", "int4")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would start from the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folk(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"folk {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc


# -- workers (one subprocess per engine; commands on stdin, one JSON line per answer) --------
def worker_folklm(target: str, dtype: str | None, ids: list[int], n_new: int):
    import torch

    import folklm
    from folklm.engine.generate import generate
    from folklm.ops.sampling import SamplingParams

    llm = folklm.load(target, dtype=dtype)
    kinds = sorted({type(m).__name__ for m in llm.model.modules() if "Linear" in type(m).__name__})
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    full = SamplingParams(max_new_tokens=n_new, ignore_eos=True)

    def call(params):
        return generate(llm.model, llm.tokenizer, [ids], params, [])

    from folklm.engine import native_step

    step = "native" if native_step.for_model(llm.model) is not None else "torch"
    dtype_name = str(llm.dtype).removeprefix("torch.")
    info = {"dtype": dtype_name, "linears": "+".join(kinds), "step": step}
    return info, lambda: call(one), lambda: call(full)[0].token_ids, torch


def worker_transformers(target: str, dtype: str, ids: list[int], n_new: int):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(target, dtype=getattr(torch, dtype)).eval()
    x = torch.tensor([ids])
    kw = dict(
        attention_mask=torch.ones_like(x),
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        logits_to_keep=1,  # the LM head for the last prompt position only, as folklm does
    )

    def call(n):
        with torch.inference_mode():
            return hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)

    info = {"dtype": dtype, "linears": "Linear"}
    return info, lambda: call(1), lambda: call(n_new)[0, len(ids) :].tolist(), torch


def worker(args) -> None:
    ids = json.loads(args.ids)
    make = worker_folklm if args.worker == "folklm" else worker_transformers
    import torch

    torch.set_num_threads(args.threads)
    info, prefill, full, _ = make(args.target, args.dtype, ids, args.new_tokens)
    prefill(), full()  # warm-up (first-call allocations, oneDNN primitive creation)
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        t = time.perf_counter()
        prefill()
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        tokens = full()
        total = time.perf_counter() - t
        print(json.dumps({"prefill_s": t_prefill, "total_s": total, "tokens": tokens}), flush=True)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


class Engine:
    """A worker subprocess kept alive across rounds, so rounds interleave between engines."""

    def __init__(self, label: str, kind: str, target: str, dtype: str | None, args, ids, env):
        self.label, self.kind, self.weights = label, kind, Path(target).name
        cmd = [sys.executable, __file__, "--worker", kind, "--target", target]
        cmd += ["--ids", json.dumps(ids), "--threads", str(args.threads)]
        cmd += ["--new-tokens", str(args.new_tokens)] + (["--dtype", dtype] if dtype else [])
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = self._read()
        self.rounds: list[dict] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.label}: worker died (see its stderr above)")
        return json.loads(line)

    def round(self) -> None:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        self.rounds.append(self._read())

    def finish(self, n_prompt: int, n_new: int) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        rss = self._read()["peak_rss_mb"]
        self.proc.wait()
        mid = sorted(self.rounds, key=lambda r: r["total_s"])[len(self.rounds) // 2]
        return {
            "engine": self.label,
            "weights": self.weights,
            "linears": self.info.get("linears", ""),
            "step": self.info.get("step", ""),
            "prefill_tps": statistics.median(n_prompt / r["prefill_s"] for r in self.rounds),
            "decode_tps": statistics.median(
                (n_new - 1) / max(r["total_s"] - r["prefill_s"], 1e-9) for r in self.rounds
            ),
            "peak_rss_mb": rss,
            "tokens": mid["tokens"],
        }


# -- llama.cpp --------------------------------------------------------------------------------
def find_llama_bench(explicit: str | None) -> str | None:
    for cand in [explicit, os.environ.get("LLAMA_BENCH")] + sorted(
        glob.glob(
            os.path.expanduser("~/.cache/folk-peers/llama.cpp-*/src/vendor/llama.cpp/build/bin/")
            + "llama-bench"
        )
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def llama_bench_round(binary: str, gguf: Path, args) -> dict:
    """One ``llama-bench`` process: prefill and decode tok/s, and its own peak RSS."""
    cmd = [binary, "-m", str(gguf), "-t", str(args.threads), "-r", "1", "-o", "json"]
    cmd += ["-p", str(args.prompt_tokens), "-n", str(args.new_tokens)]
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as errf:
        proc = subprocess.Popen(cmd, stdout=out, stderr=errf, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        errf.seek(0)
        text, err = out.read(), errf.read()
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed on {gguf.name}: {err.strip()[-500:]}")
    res = {"peak_rss_mb": usage.ru_maxrss / 1024}
    for rec in json.loads(text):
        key = "prefill_tps" if rec.get("n_prompt") and not rec.get("n_gen") else "decode_tps"
        res[key] = float(rec["avg_ts"])
    return res


# -- the run ----------------------------------------------------------------------------------
def default_folder() -> str:
    from folklm.hub.defaults import default_model_folder

    return str(default_model_folder())


def prepare(args, env: dict) -> tuple[str, dict[str, Path], dict[str, str]]:
    """The HF folder, the GGUF files and the quantized entries (all outside any timer)."""
    out = Path(env["FOLK_HOME"]) / "bench-gguf"
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        name, folder = "bench:base", args.model
        folk("import", args.model, "--name", name, env=env)
    else:  # registered and converted by the cold-start runs
        name, folder = "smollm2-135m-instruct", default_folder()
    ggufs: dict[str, Path] = {}
    entries: dict[str, str] = {}

    def export(entry: str, file: str, dtype: str | None) -> Path:
        path = out / file
        extra = ["--dtype", dtype] if dtype else []
        folk("export", entry, str(path), "--format", "gguf", "--force", *extra, env=env)
        return path

    if "float32" in args.precisions:
        ggufs["f32"] = export(name, "model-f32.gguf", "f32")
    if "bfloat16" in args.precisions:
        ggufs["bf16"] = export(name, "model-bf16.gguf", "bf16")
        ggufs["f16"] = export(name, "model-f16.gguf", "f16")
    for prec, scheme, gtype in (("int8", "int8", "q8_0"), ("int4", "int4-g32", "q4_0")):
        if prec in args.precisions:
            entries[prec] = f"bench:{scheme}"
            folk("quantize", name, "--scheme", scheme, "--out", entries[prec], env=env)
            ggufs[gtype] = export(entries[prec], f"model-{gtype}.gguf", None)
    return folder, ggufs, entries


def groups(args, folder: str, ggufs: dict[str, Path], entries: dict[str, str]):
    """(precision, [(label, kind, target, dtype, env)], [(label, gguf)]) per precision."""
    for prec in args.precisions:
        if prec in ("float32", "bfloat16"):
            py = [
                ("folklm", "folklm", folder, prec, {}),
                ("transformers", "transformers", folder, prec, {}),
            ]
            ll = [("llama.cpp", ggufs["f32"])] if prec == "float32" else []
            ll += [("llama.cpp", ggufs["bf16"]), ("llama.cpp", ggufs["f16"])] * (prec == "bfloat16")
        else:
            gtype = "q8_0" if prec == "int8" else "q4_0"
            py = [
                ("folklm", "folklm", entries[prec], None, {}),
                ("folklm (gguf)", "folklm", str(ggufs[gtype]), None, {}),
                # activations rounded to int8 once, as llama.cpp does (default: twice)
                ("folklm (gguf,1)", "folklm", str(ggufs[gtype]), None, {"FOLK_GGUF_LEVELS": "1"}),
            ]
            ll = [("llama.cpp", ggufs[gtype])]
        yield prec, py, ll


def cold_start(env: dict) -> dict:
    """``folk run --json`` twice on the default model in a fresh FOLK_HOME: the first run
    converts the bundled GGUF, the second finds it cached (what a user sees every day)."""
    res: dict = {}
    res0: dict = {}
    for i in range(2):
        proc = folk("run", "Say hi.", "-n", "4", "--json", env=env)
        out = json.loads(proc.stdout)
        res = {
            "time_to_first_token_s": out.get("time_to_first_token_s"),
            "process_time_to_first_token_s": out.get("process_time_to_first_token_s"),
            "load_seconds": out.get("load_seconds"),
            "dtype": out.get("dtype"),
        }
        if i == 0:
            res0 = dict(res)
    return {"first_run": res0, "second_run": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="Hugging Face folder (default: the bundled model)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--llama-bench", help="llama-bench binary (default: $LLAMA_BENCH or cache)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    args.precisions = [p for p in args.precisions.split(",") if p]
    from folklm.kernels.cpu import cpu_info

    home = tempfile.mkdtemp(prefix="folk-bench-home-")
    threads = str(args.threads)
    env = {**os.environ, "FOLK_HOME": home, "OMP_NUM_THREADS": threads}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    print(f"CPU: {cpu_info().summary()}")
    print(f"threads {args.threads}; load average before: {os.getloadavg()}", flush=True)
    os.environ["FOLK_HOME"] = home
    cold = cold_start(env)
    folder, ggufs, entries = prepare(args, env)
    import folklm

    tok = folklm.load(folder, dtype="float32", fast=False).tokenizer
    ids = tok.encode(gzip.decompress(DATA.read_bytes()).decode("utf-8"))[: args.prompt_tokens]
    assert len(ids) == args.prompt_tokens
    binary = find_llama_bench(args.llama_bench)
    if binary is None:
        print("no llama-bench found (build it with llama-cpp.sh): no llama.cpp rows")
    results: dict = {"cpu": cpu_info().summary(), "threads": args.threads, "precisions": {}}
    table = []
    for prec, py, ll in groups(args, folder, ggufs, entries):
        engines = [
            Engine(lab, kind, tgt, dt, args, ids, {**env, **extra})
            for lab, kind, tgt, dt, extra in py
        ]
        lruns: dict[str, list[dict]] = {str(g): [] for _, g in ll}

        def peer_round(g: Path, lruns: dict[str, list[dict]] = lruns) -> None:
            try:
                lruns[str(g)].append(llama_bench_round(binary, g, args))
            except RuntimeError as err:
                print(err)

        turns = [e.round for e in engines]
        turns += [lambda g=g: peer_round(g) for _, g in (ll if binary else [])]
        for r in range(args.rounds):
            # the order rotates every round: the first call after another engine's run is
            # slower (its caches and threads are cold), and no engine should always pay it
            k = r % len(turns)
            for turn in turns[k:] + turns[:k]:
                turn()
        rows = [e.finish(args.prompt_tokens, args.new_tokens) for e in engines]
        for lab, g in ll:
            runs = lruns[str(g)]
            if runs:
                rows.append(
                    {
                        "engine": lab,
                        "weights": g.name,
                        "linears": "ggml",
                        "prefill_tps": statistics.median(r["prefill_tps"] for r in runs),
                        "decode_tps": statistics.median(r["decode_tps"] for r in runs),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                    }
                )
        ours = rows[0]
        ratios = {}
        for r in rows[1:]:
            key = f"{r['engine']}:{r['weights']}"
            ratios[key] = {
                "decode": round(ours["decode_tps"] / r["decode_tps"], 3),
                "prefill": round(ours["prefill_tps"] / r["prefill_tps"], 3),
            }
            if r.get("tokens") is not None and r["engine"] == "transformers":
                same = sum(a == b for a, b in zip(ours["tokens"], r["tokens"], strict=False))
                ratios[key]["same_greedy_tokens"] = f"{same}/{len(ours['tokens'])}"
        results["precisions"][prec] = {
            "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
            "folklm_vs": ratios,
        }
        table += [(prec, r) for r in rows]
        print(f"{prec}: done; load average {os.getloadavg()}", flush=True)
    results["cold_start"] = cold
    results["load_average_after"] = os.getloadavg()

    print(
        f"\n{'precision':<9} {'engine':<13} {'weights':<18} {'linears':<24} {'step':<6} "
        f"{'prefill t/s':>11} {'decode t/s':>10} {'peak RSS MB':>11}"
    )
    for prec, r in table:
        print(
            f"{prec:<9} {r['engine']:<13} {r['weights'][:18]:<18} {r['linears'][:24]:<24} "
            f"{r.get('step', ''):<6} {r['prefill_tps']:>11.1f} {r['decode_tps']:>10.1f} "
            f"{r['peak_rss_mb']:>11.0f}"
        )
    print()
    for prec, res in results["precisions"].items():
        for peer, rat in res["folklm_vs"].items():
            extra = f", same greedy tokens {rat['same_greedy_tokens']}" if len(rat) > 2 else ""
            print(
                f"{prec}: folklm vs {peer}: decode {rat['decode']}x, prefill {rat['prefill']}x"
                f"{extra}"
            )
    cs = results["cold_start"]
    print(
        f"cold start (folk run --json, default model, {cs['second_run']['dtype']}): time to first "
        f"token {cs['first_run']['time_to_first_token_s']} s first run (converts the bundled "
        f"GGUF), {cs['second_run']['time_to_first_token_s']} s second run; from process start "
        f"{cs['second_run']['process_time_to_first_token_s']} s"
    )
    print(f"load average after: {results['load_average_after']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
