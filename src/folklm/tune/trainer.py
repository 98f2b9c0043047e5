"""The training loop: AdamW, warm-up + cosine/linear decay, accumulation, clipping, resume.

AdamW (Loshchilov & Hutter, 2019, arXiv:1711.05101) on the trainable parameters only; the
learning rate rises linearly for ``warmup_steps`` and then decays to zero (cosine, SGDR,
arXiv:1608.03983, or linear). One optimizer step consumes a *global batch* of
``batch_size x grad_accum x world_size`` examples from a stream that is a fresh seeded
permutation of the data each epoch; the loss is the sum over the global batch divided by
its number of target units (tokens, or pairs for DPO), counted across processes first, so
that one process and N processes compute the same gradient.

A checkpoint (trainable weights, optimizer, scheduler, step, RNG state) is written
atomically every ``save_every`` steps; a resumed run restarts from the last one and,
because the data stream is a function of (seed, position), sees the same batches in the
same order: it ends with the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.checkpoint import checkpoint

from folklm.errors import FolkError
from folklm.models.llama import CausalLM
from folklm.tune import distributed as dist_
from folklm.tune.recipe import Recipe


class Task(Protocol):
    """What the loop needs from SFT or DPO."""

    def module(self, model: CausalLM) -> nn.Module: ...  # forward(**batch) -> loss sum

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...  # loss normaliser

    def tokens(self, examples: Sequence[Any]) -> int: ...  # real (unpadded) tokens

    def evaluate(self, model: CausalLM, examples: Sequence[Any]) -> dict[str, float]: ...


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    eval: dict[str, float]
    first_eval: dict[str, float]
    tokens_per_s: float
    tokens: int
    peak_rss_bytes: int
    run_dir: Path
    resumed_from: int | None = None
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def lr_factor(step: int, recipe: Recipe) -> float:
    """Multiplier of ``lr`` for optimizer step ``step`` (0-based)."""
    warm, total = recipe.warmup_steps, recipe.max_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    if recipe.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if recipe.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class DataStream:
    """Example index at stream position k: epoch ``k // n`` is a permutation seeded by
    (seed, epoch), so any position can be recomputed after a restart."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm: tuple[int, list[int]] = (-1, [])  # (epoch, permutation): none yet

    def __getitem__(self, k: int) -> int:
        epoch = k // self.n
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1][k % self.n]


def split_eval(examples: list, recipe: Recipe) -> tuple[list, list]:
    """Seeded held-out split: ``eval_fraction`` of the examples (at most
    ``eval_max_examples``), never all of them."""
    n = len(examples)
    k = min(int(round(n * recipe.eval_fraction)), recipe.eval_max_examples, n - 1)
    if k <= 0:
        return list(examples), []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed + 7)).tolist()
    held = set(perm[:k])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in perm[:k]]


def enable_activation_checkpointing(model: CausalLM) -> None:
    """Recompute each decoder layer in the backward pass instead of storing its activations."""
    for layer in model.model.layers:
        inner = layer.forward

        def wrapped(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = wrapped


# -- checkpoints --------------------------------------------------------------------------
def _ckpt_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(_ckpt_dir(run_dir).glob("step-*.pt"))
    return found[-1] if found else None


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(run_dir: Path, step: int, model, opt, sched, recipe: Recipe) -> None:
    folder = _ckpt_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "weights": {n: p.detach().clone() for n, p in _trainable(model).items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "recipe": recipe.to_dict(),
    }
    tmp = folder / f".step-{step:07d}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / f"step-{step:07d}.pt")  # atomic: a kill leaves old or new
    for old in sorted(folder.glob("step-*.pt"))[:-2]:
        old.unlink(missing_ok=True)


def _load_checkpoint(path: Path, model, opt, sched, recipe: Recipe) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = dict(state["recipe"])
    now = recipe.to_dict()
    for key in ("max_steps",):  # a resumed run may train for longer
        saved.pop(key, None)
        now.pop(key, None)
    diff = sorted(k for k in now if saved.get(k) != now[k])
    if diff:
        k = diff[0]
        raise FolkError(
            f"{path}: cannot resume with a different recipe ({k}={now[k]!r}, "
            f"checkpoint has {saved.get(k)!r})"
        )
    params = _trainable(model)
    if set(params) != set(state["weights"]):
        raise FolkError(f"{path}: checkpoint does not match the trainable parameters")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["weights"][n])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


# -- metrics ------------------------------------------------------------------------------
def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path:
    """Train (and eval) loss against step, as a PNG."""
    # lazy: matplotlib takes ~0.5 s to import and only the loss plot needs it
    import matplotlib

    matplotlib.use("Agg")
    # pyplot after the Agg backend is chosen
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    train = [r for r in history if r["type"] == "train"]
    evals = [r for r in history if r["type"] == "eval"]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None

    bar = Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar.start()
    bar.add_task("train", total=total, completed=start, loss="-", tps="-")
    return bar


# -- the loop -----------------------------------------------------------------------------
def train(
    model: CausalLM,
    recipe: Recipe,
    task: Task,
    train_examples: list,
    eval_examples: list,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, nn.Module], None] | None = None,
    on_grads: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place; metrics, checkpoints and the loss plot go to ``run_dir``.

    Under ``torchrun`` (see :mod:`folklm.tune.distributed`) every process calls this with
    the same arguments; rank 0 alone writes files.
    """
    run_dir = Path(run_dir)
    ctx = dist_.context()
    if not train_examples:
        raise FolkError("the training set is empty")
    params = list(_trainable(model).values())
    if not params:
        raise FolkError("nothing to train: every parameter is frozen")
    if recipe.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    module = dist_.wrap(task.module(model), recipe, ctx)
    opt = torch.optim.AdamW(
        params,
        lr=recipe.lr,
        betas=(recipe.adam_beta1, recipe.adam_beta2),
        eps=recipe.adam_eps,
        weight_decay=recipe.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe))
    metrics_path = run_dir / "metrics.jsonl"
    start, resumed = 0, None
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    last = latest_checkpoint(run_dir) if resume else None
    if resume and last is None and ctx.rank == 0 and metrics_path.exists():
        metrics_path.unlink()
    if last is not None:
        start = resumed = _load_checkpoint(last, model, opt, sched, recipe)
    else:
        torch.manual_seed(recipe.seed)
    history = _read_metrics(metrics_path, start) if start else []
    if ctx.rank == 0:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    stream = DataStream(len(train_examples), recipe.seed)
    per_rank = recipe.batch_size * recipe.grad_accum
    global_batch = per_rank * ctx.world
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if recipe.bf16 else nullcontext()
    first_eval = task.evaluate(model, eval_examples) if eval_examples and start == 0 else {}
    if first_eval:
        _log(history, metrics_path, ctx, {"type": "eval", "step": 0, **first_eval})
    bar = _progress(progress and ctx.rank == 0, recipe.max_steps, start)
    tokens_done, train_time, loss_value = 0, 0.0, None
    t_start = time.perf_counter()
    try:
        for step in range(start, recipe.max_steps):
            t0 = time.perf_counter()
            base = step * global_batch + ctx.rank * per_rank
            idx = [stream[base + i] for i in range(per_rank)]
            chunks = [
                [train_examples[j] for j in idx[i : i + recipe.batch_size]]
                for i in range(0, per_rank, recipe.batch_size)
            ]
            micro = [task.collate(c) for c in chunks]
            units = torch.tensor([sum(task.units(b) for b in micro)], dtype=torch.float64)
            tokens = torch.tensor([sum(task.tokens(c) for c in chunks)], dtype=torch.float64)
            dist_.all_reduce_sum(units, ctx)
            dist_.all_reduce_sum(tokens, ctx)
            # DDP averages gradients over ranks: scale by world / global units.
            scale = ctx.world / max(1.0, units.item())
            loss_sum = torch.zeros(1, dtype=torch.float64)
            for i, batch in enumerate(micro):
                sync = dist_.no_sync(module) if i < len(micro) - 1 else nullcontext()
                with sync:
                    with autocast:
                        loss = module(**batch)
                    (loss.float() * scale).backward()
                loss_sum += loss.detach().double()
            dist_.all_reduce_sum(loss_sum, ctx)
            if on_grads is not None:  # the reduced, unclipped gradients of this step
                on_grads(step + 1, model)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(step + 1, model)
            dt = time.perf_counter() - t0
            train_time += dt
            tokens_done += int(tokens.item())
            loss_value = loss_sum.item() / max(1.0, units.item())
            done = step + 1
            if done % recipe.log_every == 0 or done == recipe.max_steps:
                row = {
                    "type": "train",
                    "step": done,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens": int(tokens.item()),
                    "tokens_per_s": tokens.item() / dt,
                    "elapsed_s": time.perf_counter() - t_start,
                }
                _log(history, metrics_path, ctx, row)
            if eval_examples and (done % recipe.eval_every == 0 or done == recipe.max_steps):
                _log(
                    history,
                    metrics_path,
                    ctx,
                    {"type": "eval", "step": done, **task.evaluate(model, eval_examples)},
                )
            if done % recipe.save_every == 0 and done < recipe.max_steps and ctx.rank == 0:
                _save_checkpoint(run_dir, done, model, opt, sched, recipe)
            if bar is not None:
                bar.update(
                    bar.task_ids[0],
                    completed=done,
                    loss=f"{loss_value:.4f}",
                    tps=f"{tokens_done / train_time:.0f}",
                )
    finally:
        if bar is not None:
            bar.stop()
    if ctx.rank == 0 and history:
        plot_losses(history, run_dir / "loss.png")
    evals = [r for r in history if r["type"] == "eval"]
    first = next((r for r in evals if r["step"] == 0), None)
    clean = lambda r: {k: v for k, v in r.items() if k not in ("type", "step")}  # noqa: E731
    trains = [r for r in history if r["type"] == "train"]
    return TrainResult(
        steps=recipe.max_steps,
        train_loss=loss_value
        if loss_value is not None
        else (trains[-1]["loss"] if trains else None),
        eval=clean(evals[-1]) if evals else {},
        first_eval=clean(first) if first else {},
        tokens_per_s=tokens_done / train_time if train_time else 0.0,
        tokens=tokens_done,
        peak_rss_bytes=peak_rss_bytes(),
        run_dir=run_dir,
        resumed_from=resumed,
        seconds=train_time,
        history=history,
    )


def _log(history: list, path: Path, ctx, row: dict[str, Any]) -> None:
    history.append(row)
    if ctx.rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
