"""One training step of folklm's trainer, run alone or under torchrun; saves the gradients.

python ddp_step.py MODEL DATA OUT.pt RUN_DIR BATCH_SIZE GRAD_ACCUM
torchrun --standalone --nproc-per-node 2 ddp_step.py ...
"""

from __future__ import annotations

import sys

import torch

import folklm
from folklm.tune import distributed
from folklm.tune.data import build_dataset
from folklm.tune.loss import SFTTask
from folklm.tune.recipe import Recipe
from folklm.tune.run import prepare_model
from folklm.tune.trainer import train


def main() -> None:
    model, data, out, run_dir, bs, acc = sys.argv[1:7]
    recipe = Recipe(
        max_steps=1, batch_size=int(bs), grad_accum=int(acc), eval_fraction=0.0,
        max_seq_len=128, lora_rank=4, target_modules=["all-linear"], seed=11,
    )  # fmt: skip
    llm = folklm.load(model, fast=False, dtype="float32")
    ds = build_dataset(data, llm.tokenizer, recipe.max_seq_len)
    torch.manual_seed(recipe.seed)
    prepare_model(llm, recipe, None)
    with torch.no_grad():  # non-zero B, so that A gets a gradient too
        for n, p in llm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    grads: dict[str, torch.Tensor] = {}

    def keep(step, model):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    ctx = distributed.context()
    train(llm.model, recipe, SFTTask(), ds.examples, [], run_dir, progress=False, on_grads=keep)
    if ctx.rank == 0:
        torch.save(grads, out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
