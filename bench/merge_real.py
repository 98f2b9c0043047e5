"""A real merge: two LoRA fine-tunes of the default model, merged with TIES, keep both.

1. Trains two LoRA adapters on SmolLM2-135M-Instruct (the bundled default model) with the
   reference tooling (Hugging Face ``transformers`` + ``peft``; folklm's own fine-tuner is
   a separate piece of work): one on ``alpaca_tiny`` (Alpaca prompt format), one on
   ``sharegpt_dummy_conversation`` (ChatML chat turns). Loss on response tokens only.
2. Fuses each adapter into the base with ``folk merge`` (``lora_fuse``), registering two
   specialists, then merges base + both specialists with ``folk merge`` (TIES, Yadav et
   al., 2023), registering the merge with its parents.
3. Measures the held-out loss (mean NLL per response token, records not trained on) of
   base / each specialist / the merge on each data set, with ``transformers`` loading each
   registered folder. A merge keeps a behaviour when its loss on that set is closer to
   the specialist's than to the base's.

    PYTHONPATH=$PWD/src python bench/merge_real.py [--steps 30] [--lr 5e-4] [--density 0.2 0.7]

Runs on the CPU in about 10-20 minutes (contended); ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from folklm import datasets

ROOT = Path(__file__).resolve().parents[1]
ALPACA = "alpaca_tiny/alpaca_tiny.json"  # shipped data files (folklm.datasets)
SHAREGPT = "sharegpt_dummy_conversation/dummy_conversation.json"


def alpaca_records(tok) -> list[list[tuple[str, bool]]]:
    """(text, trained) segments: the Alpaca prompt (not trained on), then the response."""
    out = []
    for r in json.loads(datasets.read_text(ALPACA)):
        prompt = r["text"][: r["text"].index("### Response:\n") + len("### Response:\n")]
        out.append([(prompt, False), (r["output"] + tok.eos_token, True)])
    return out


def sharegpt_records(tok) -> list[list[tuple[str, bool]]]:
    """ChatML turns; only the assistant's words (and its end marker) are trained on."""
    out = []
    for r in json.loads(datasets.read_text(SHAREGPT)):
        segs = []
        for turn in r["conversations"]:
            if turn["from"] == "human":
                segs.append((f"<|im_start|>user\n{turn['value']}<|im_end|>\n", False))
            else:
                segs.append(("<|im_start|>assistant\n", False))
                segs.append((f"{turn['value']}<|im_end|>\n", True))
        out.append(segs)
    return out


def encode(tok, segs, max_len: int) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, trained in segs:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids[:max_len], labels[:max_len]


def split(records, n_eval: int, seed: int = 0):
    rng = random.Random(seed)
    idx = list(range(len(records)))
    rng.shuffle(idx)
    return [records[i] for i in idx[n_eval:]], [records[i] for i in idx[:n_eval]]


def batches(tok, records, batch: int, max_len: int):
    for s in range(0, len(records), batch):
        enc = [encode(tok, r, max_len) for r in records[s : s + batch]]
        n = max(len(i) for i, _ in enc)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([i + [pad] * (n - len(i)) for i, _ in enc])
        lab = torch.tensor([la + [-100] * (n - len(la)) for _, la in enc])
        att = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in enc])
        yield ids, lab, att


@torch.no_grad()
def held_out_loss(model, tok, records, max_len: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for ids, lab, att in batches(tok, records, 8, max_len):
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        target = lab[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += int((target != -100).sum())
    return total / count


def train_adapter(base_folder, tok, records, out: Path, steps, seed, max_len, lr):
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    model = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        batch = rng.sample(records, 4)
        ids, lab, att = next(batches(tok, batch, 4, max_len))
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        print(f"  step {step + 1}/{steps} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.save_pretrained(out)
    return {"first_loss": losses[0], "last_loss": losses[-1], "seconds": time.perf_counter() - t0}


def folk(*args: str, env) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        sys.exit(f"folk {' '.join(args)} failed: {proc.stderr}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--density", type=float, nargs="+", default=[0.2, 0.7], help="TIES densities to try"
    )
    ap.add_argument("--reuse", action="store_true", help="reuse adapters found in --keep")
    ap.add_argument(
        "--weights", type=float, nargs=2, default=[1.0, 1.0], help="alpaca, sharegpt weights"
    )
    ap.add_argument("--no-normalize", action="store_true", help="TIES normalize: false")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--keep", help="keep the work folder (adapters, FOLK_HOME) here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: shared cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.keep or tempfile.mkdtemp(prefix="merge-real-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FOLK_HOME": os.environ.get("FOLK_HOME", str(work / "home"))}
    env["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["FOLK_HOME"] = env["FOLK_HOME"]
    from folklm.hub.defaults import DEFAULT_NAME, default_model_folder

    base_folder = default_model_folder()  # converts + registers the bundled model
    tok = AutoTokenizer.from_pretrained(base_folder)
    sets = {
        "alpaca_tiny": split(alpaca_records(tok), 20),
        "sharegpt_dummy_conversation": split(sharegpt_records(tok), 30),
    }
    training = {}
    for i, (name, (train, _)) in enumerate(sets.items()):
        out = work / f"adapter-{name}"
        if args.reuse and (out / "adapter_config.json").is_file():
            print(f"reusing {out}", file=sys.stderr)
            continue
        print(f"training the {name} adapter ({len(train)} records)", file=sys.stderr)
        training[name] = train_adapter(
            base_folder, tok, train, out, args.steps, i, args.max_len, args.lr
        )
    entries = {}
    for name in sets:
        recipe = work / f"fuse-{name}.yaml"
        recipe.write_text(
            f"merge_method: lora_fuse\nbase_model: {DEFAULT_NAME}\n"
            f"adapter: {work / f'adapter-{name}'}\n"
        )
        entries[name] = folk(
            "merge", str(recipe), "--out", f"spec-{name.split('_')[0]}:v1", env=env
        )
    merges = {}
    for density in args.density:
        recipe = work / f"ties-{density}.yaml"
        recipe.write_text(
            f"merge_method: ties\nbase_model: {DEFAULT_NAME}\nmodels:\n"
            + "".join(
                f"  - model: {e['name']}\n    parameters: {{weight: {w}, density: {density}}}\n"
                for e, w in zip(entries.values(), args.weights, strict=True)
            )
            + f"parameters: {{normalize: {'false' if args.no_normalize else 'true'}}}\n"
            + "dtype: float32\nseed: 0\n"
        )
        merges[density] = folk("merge", str(recipe), "--out", f"spec-merge:ties-{density}", env=env)
    from folklm.hub.api import resolve_model

    models = {"base": DEFAULT_NAME, **{f"spec:{k}": e["name"] for k, e in entries.items()}}
    models.update({f"merge:ties density {d}": m["name"] for d, m in merges.items()})
    losses: dict[str, dict[str, float]] = {}
    for label, ref in models.items():
        model = AutoModelForCausalLM.from_pretrained(resolve_model(ref), dtype=torch.float32)
        losses[label] = {
            s: round(held_out_loss(model, tok, ev, args.max_len), 4) for s, (_, ev) in sets.items()
        }
        del model
    print(
        f"\nheld-out loss per response token (LoRA r=16, {args.steps} steps at lr {args.lr}; "
        f"TIES weights {args.weights}, normalize {not args.no_normalize})"
    )
    print(f"{'model':<36}" + "".join(f"{s:>30}" for s in sets))
    for label, row in losses.items():
        print(f"{label:<36}" + "".join(f"{row[s]:>30.4f}" for s in sets))
    kept: dict[str, dict[str, bool]] = {}
    for d in merges:
        kept[str(d)] = {}
        for s in sets:
            b, sp = losses["base"][s], losses[f"spec:{s}"][s]
            m = losses[f"merge:ties density {d}"][s]
            # kept: the specialist gained over the base on its own set, and the merge's loss
            # there is closer to the specialist's than to the base's
            kept[str(d)][s] = sp < b and abs(m - sp) < abs(m - b)
            share = (b - m) / (b - sp) if b != sp else float("nan")
            print(
                f"density {d} on {s}: specialist gain {b - sp:+.4f}, merge gain {b - m:+.4f} "
                f"({share:.0%} of it); kept: {kept[str(d)][s]}"
            )
    print(
        json.dumps(
            {
                "bench": "merge_real",
                "steps": args.steps,
                "lr": args.lr,
                "weights": args.weights,
                "normalize": not args.no_normalize,
                "training": training,
                "losses": losses,
                "kept": kept,
                "merges": {
                    str(d): {k: m[k] for k in ("name", "hash", "parents", "peak_rss_bytes")}
                    for d, m in merges.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
