"""LoRA training speed and memory: folklm vs transformers + peft, same run, one machine.

Both engines load the same Hugging Face folder (by default the bundled SmolLM2-135M-Instruct
as folklm converts it) in float32, put a rank-8 LoRA (alpha 16, no dropout) on q/k/v/o,
and train with AdamW (lr 1e-4, gradient clipping 1.0) on the *same* batches: ShareGPT
conversations rendered with the model's chat template, assistant-only labels, packed into
blocks of 256 tokens, batch 4 (folklm's data pipeline builds them once; both engines read
the same tensors). Each engine runs in its own subprocess so that its peak RSS is its own;
the engines alternate for ``--rounds`` rounds (folklm, peft, folklm, peft, ...) so that a
change in the machine's load hits both, and the load average is printed with the figures.
Tokens/s = 4 x 256 / the median step time after ``--warmup`` steps (the median over rounds).
Every step's loss of both engines is compared: the largest per-step difference is printed
(same model, same data, same loss: it must be small).

    python bench/tune.py                  # table + one JSON line at the end
    python bench/tune.py --steps 10 --rounds 3 --model DIR
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = "sharegpt_dummy_conversation/dummy_conversation.json"  # a shipped data file
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_batches(model: str, steps: int, batch: int, seq: int, path: Path) -> None:
    from folklm.tokenizer import Tokenizer
    from folklm.tune.data import IGNORE, build_dataset

    tok = Tokenizer.from_folder(model)
    from folklm import datasets

    ds = build_dataset(datasets.path(DATA), tok, seq, pack=True)
    blocks = [e for e in ds.examples if len(e.input_ids) > seq // 2]
    need = steps * batch
    blocks = (blocks * (need // len(blocks) + 1))[:need]
    pad = tok.pad_token_id or 0
    ids = torch.tensor([e.input_ids + [pad] * (seq - len(e.input_ids)) for e in blocks])
    labels = torch.tensor([e.labels + [IGNORE] * (seq - len(e.labels)) for e in blocks])
    torch.save(
        {"input_ids": ids.view(steps, batch, seq), "labels": labels.view(steps, batch, seq)}, path
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_folklm(model: str, batches: dict, lr: float) -> tuple[list[float], list[float]]:
    import folklm
    from folklm.tune.loss import SFTTask
    from folklm.tune.recipe import Recipe
    from folklm.tune.run import prepare_model

    llm = folklm.load(model, dtype="float32", fast=False)  # the default is bf16 on bf16 CPUs
    recipe = Recipe(lora_rank=8, lora_alpha=16, target_modules=TARGETS)
    torch.manual_seed(0)
    prepare_model(llm, recipe, None)
    llm.model.train()
    module = SFTTask().module(llm.model)

    def step_loss(ids, labels):
        units = int((labels[:, 1:] != -100).sum())
        return module(ids, labels) / units  # the trainer's loss: sum / target tokens

    return train_steps(llm.model, step_loss, batches, lr)


def run_peft(model: str, batches: dict, lr: float) -> tuple[list[float], list[float]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    torch.manual_seed(0)
    pm = get_peft_model(hf, cfg)
    pm.train()
    return train_steps(pm, lambda ids, labels: pm(input_ids=ids, labels=labels).loss, batches, lr)


def train_steps(model, step_loss, batches: dict, lr: float) -> tuple[list[float], list[float]]:
    """The same AdamW + clipping loop for both engines: seconds and loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    times, losses = [], []
    for ids, labels in zip(batches["input_ids"], batches["labels"], strict=True):
        t0 = time.perf_counter()
        loss = step_loss(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return times, losses


def child(engine: str, model: str, batches_path: str, warmup: int, lr: float) -> None:
    batches = torch.load(batches_path, weights_only=True)
    fn = run_folklm if engine == "folklm" else run_peft
    times, losses = fn(model, batches, lr)
    B, T = batches["input_ids"].shape[1:]
    step = statistics.median(times[warmup:])
    out = {
        "engine": engine,
        "step_s": step,
        "tokens_per_s": B * T / step,
        "peak_rss_mb": peak_rss_mb(),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
    }
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face folder (default: the bundled SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "BATCHES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from folklm.hub.defaults import default_model_folder

        args.model = str(default_model_folder())
    if args.child:
        child(args.child[0], args.model, args.child[1], args.warmup, args.lr)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batches.pt"
        make_batches(args.model, args.steps, args.batch, args.seq, path)
        runs: dict[str, list[dict]] = {"folklm": [], "peft": []}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for engine in ("folklm", "peft"):
                cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--lr", str(args.lr),
                       "--child", engine, str(path)]  # fmt: skip
                r = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if r.returncode != 0:
                    raise SystemExit(f"{engine} failed:\n{r.stderr[-3000:]}")
                runs[engine].append(json.loads(r.stdout.strip().splitlines()[-1]))
        load_after = os.getloadavg()

    def merged(rounds: list[dict]) -> dict:
        out = dict(rounds[0])
        out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rounds)
        out["step_s"] = statistics.median(r["step_s"] for r in rounds)
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
        out["tokens_per_s_rounds"] = [round(r["tokens_per_s"], 2) for r in rounds]
        return out

    f, p = merged(runs["folklm"]), merged(runs["peft"])
    # every step of every round, both engines: the largest loss difference
    diffs = [
        abs(a - b)
        for rf in runs["folklm"]
        for rp in runs["peft"]
        for a, b in zip(rf["losses"], rp["losses"], strict=True)
    ]
    max_diff = max(diffs)
    load = "load average {:.1f} {:.1f} {:.1f}".format
    print(f"LoRA r=8 q/k/v/o, seq {args.seq}, batch {args.batch}, fp32, {args.steps} steps "
          f"(median after {args.warmup}), {args.rounds} alternating rounds; "
          f"model {args.model}")  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs, {load(*load_before)} before, "
          f"{load(*load_after)} after")  # fmt: skip
    head = ("engine", "tokens/s", "step s", "peak RSS MB", "loss 1st", "loss last")
    print(f"{head[0]:<22}" + "".join(f"{h:>12}" for h in head[1:]))
    for name, r in (("folklm", f), ("transformers+peft", p)):
        print(f"{name:<22}{r['tokens_per_s']:>12.0f}{r['step_s']:>12.2f}{r['peak_rss_mb']:>12.0f}"
              f"{r['first_loss']:>12.4f}{r['last_loss']:>12.4f}")  # fmt: skip
    print(f"largest per-step loss difference over all {args.steps} steps: {max_diff:.2e}")
    summary = {
        "bench": "tune",
        "model": args.model,
        "steps": args.steps,
        "rounds": args.rounds,
        "batch": args.batch,
        "seq": args.seq,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "folklm": f,
        "peft": p,
        "first_loss_diff": abs(f["first_loss"] - p["first_loss"]),
        "max_step_loss_diff": max_diff,
        "tokens_per_s_ratio_vs_peft": f["tokens_per_s"] / p["tokens_per_s"],
        "peak_rss_ratio_vs_peft": f["peak_rss_mb"] / p["peak_rss_mb"],
    }
    print(f"ratios: tokens/s x{summary['tokens_per_s_ratio_vs_peft']:.2f}, "
          f"peak RSS x{summary['peak_rss_ratio_vs_peft']:.2f}")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
