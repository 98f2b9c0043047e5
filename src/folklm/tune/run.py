"""``finetune()``: one fine-tuning run from model + data + recipe to a registry entry.

The steps ``folk tune`` (and Python users) go through: check the recipe, the output name
and the data before any training; load the base with plain ``nn.Linear`` layers; attach
LoRA / DoRA (over an NF4 base for QLoRA) or unfreeze everything (full); train; save the
adapter in PEFT's format (or the whole model) inside a :func:`folklm.hub.derive.derive`
context, which registers it (parent = the base, the full recipe, the data file's hash, the
seed) or removes it on failure. Under ``torchrun`` rank 0 alone writes and registers.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from folklm.checkpoint.hf import save_folder
from folklm.checkpoint.peft import AdapterConfig, save_adapter
from folklm.config import ModelConfig
from folklm.engine.llm import LLM, load
from folklm.errors import FolkError
from folklm.hub.derive import derive
from folklm.hub.names import ModelRef, parse_ref
from folklm.hub.resolve import resolve, resolve_path
from folklm.hub.store import folk_home
from folklm.models.llama import CausalLM
from folklm.quant.api import quantize
from folklm.tune import distributed as dist_
from folklm.tune.data import Dataset, build_dataset
from folklm.tune.dpo import DPOTask
from folklm.tune.lora import (
    adapter_state,
    apply_lora,
    dequantize_linears,
    merge_lora,
    resolve_targets,
)
from folklm.tune.loss import SFTTask
from folklm.tune.recipe import Recipe
from folklm.tune.trainer import split_eval, train


def run_folder(out: str) -> Path:
    ref = parse_ref(out)
    return folk_home() / "runs" / f"{ref.name}-{ref.tag}"


def adapter_config(recipe: Recipe, base: str | None) -> AdapterConfig:
    return AdapterConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        target_modules=list(recipe.target_modules),
        lora_dropout=recipe.lora_dropout,
        use_rslora=recipe.use_rslora,
        use_dora=recipe.method == "dora",
        base_model_name_or_path=base,
    )


def prepare_model(llm: LLM, recipe: Recipe, base: str | None) -> AdapterConfig | None:
    """Attach the trainable part for ``recipe.method``; returns the adapter config or None."""
    model = llm.model
    if recipe.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    cfg = adapter_config(recipe, base)
    resolve_targets(model, cfg.target_modules)  # a bad name fails before quantizing
    if recipe.method == "qlora":
        quantize(model, "nf4", progress=False)
    apply_lora(model, cfg)
    return cfg


def finetune(
    model: str,
    data: str | Path,
    recipe: Recipe,
    out: str,
    *,
    resume: bool = False,
    merge: bool = False,
    progress: bool = True,
    license: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (registry name or path) on ``data``; register the result as ``out``.

    Returns:
        A summary: entry name, steps, final train/eval loss, tokens/s, peak RSS, paths.

    Raises:
        FolkError: bad recipe, name, data or target module; nothing is written then.
    """
    started = time.time()
    ref = parse_ref(out)
    recipe.validate()
    base = resolve(model)
    parent, source = base.name, model
    if merge and recipe.method == "full":
        raise FolkError("--merge applies to adapters; a full fine-tune is already a whole model")
    ctx = dist_.context()
    llm = load(base.path, dtype="float32", fast=False, resolve_base=resolve_path)
    plain_config = copy.deepcopy(llm.config)  # llm.model.config, as loaded
    ds = build_dataset(
        data,
        llm.tokenizer,
        recipe.max_seq_len,
        truncate=recipe.truncate,
        pack=recipe.pack,
        preference=recipe.method == "dpo",
    )
    torch.manual_seed(recipe.seed)
    cfg = prepare_model(llm, recipe, parent or str(base.path.resolve()))
    train_ex, eval_ex = split_eval(ds.examples, recipe)
    pad = llm.tokenizer.pad_token_id or 0
    task = DPOTask(recipe.dpo_beta, pad) if recipe.method == "dpo" else SFTTask(pad)
    run_dir = run_folder(str(ref))
    if not resume and ctx.rank == 0 and run_dir.exists():
        shutil.rmtree(run_dir)
    dist_.barrier(ctx)
    net = llm.model
    assert isinstance(net, CausalLM)  # load() builds every architecture as a CausalLM
    net.train()
    result = train(net, recipe, task, train_ex, eval_ex, run_dir, resume=resume, progress=progress)
    summary: dict[str, Any] = {
        "entry": str(ref),
        "method": recipe.method,
        "base": parent or str(source),
        "data_format": ds.format,
        "examples": {
            "records": ds.records,
            "train": len(train_ex),
            "eval": len(eval_ex),
            "truncated": ds.truncated,
            "dropped": ds.dropped,
        },
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "train_loss": result.train_loss,
        "eval_loss": result.eval.get("eval_loss"),
        "eval_loss_before": result.first_eval.get("eval_loss"),
        "eval": result.eval,
        "eval_before": result.first_eval,
        "tokens_per_s": result.tokens_per_s,
        "peak_rss_bytes": result.peak_rss_bytes,
        "run_dir": str(run_dir),
        "metrics": str(run_dir / "metrics.jsonl"),
        "loss_plot": str(run_dir / "loss.png"),
    }
    if ctx.rank == 0:
        run = _Run(llm, plain_config, cfg, recipe, ds, data, ref, parent, source, run_dir)
        summary.update(_save_and_register(run, merge, started, license))
    dist_.barrier(ctx)
    return summary


@dataclass
class _Run:
    """What a finished training run hands to the hub."""

    llm: LLM  # its model in training form
    plain_config: ModelConfig  # the base's config before any adapter or quantization
    adapter: AdapterConfig | None  # None: a full fine-tune
    recipe: Recipe
    dataset: Dataset  # format and counts for the record
    data: str | Path
    ref: ModelRef
    parent: str | None  # the base's hub name, if it came from the hub
    source: str  # the base as given
    run_dir: Path


class _Record(TypedDict):
    """The :func:`~folklm.hub.derive.derive` arguments the adapter and the merge share."""

    recipe: dict[str, Any]
    data_files: list[str | Path]
    seed: int
    started_at: float


def _save_and_register(
    run: _Run, merge: bool, started: float, license: str | None
) -> dict[str, Any]:
    """Save the adapter (or the model) in the run folder and register it; ``merge``: also
    save and register the merged model. Each write is one derivation context."""
    ds, llm = run.dataset, run.llm
    full_recipe = {
        **run.recipe.to_dict(),
        "base_model": run.parent or str(run.source),
        "data_format": ds.format,
        "examples": ds.records,
        "truncated": ds.truncated,
        "dropped": ds.dropped,
    }
    operation = {"full": "finetune", "dpo": "dpo"}.get(run.recipe.method, "adapter")
    record = _Record(
        recipe=full_recipe, data_files=[run.data], seed=run.recipe.seed, started_at=started
    )
    out: dict[str, Any] = {}
    folder = run.run_dir / ("adapter" if run.adapter is not None else "model")
    parents = [run.parent] if run.parent else []
    with derive(
        str(run.ref), operation, parents=parents, license=license, folder=folder, **record
    ) as d:
        if run.adapter is not None:
            save_adapter(d.folder, run.adapter, adapter_state(llm.model))
            out["adapter_path"] = str(d.folder)
        else:
            tensors = {k: v.detach() for k, v in llm.model.state_dict().items()}
            files = llm.tokenizer.files()
            save_folder(d.folder, run.plain_config, tensors, files, llm.generation_config)
            out["model_path"] = str(d.folder)
    assert d.entry is not None  # registered when the with block ended without error
    out["entry"] = d.entry.name
    if merge:
        merge_lora(llm.model)
        dequantize_linears(llm.model)  # QLoRA: the merged model is dense (NF4 base dequantized)
        mref = f"{run.ref.name}-merged:{run.ref.tag}"
        # the merged weights come from the adapter entry (which points to the base)
        merged = run.run_dir / "merged"
        with derive(mref, "merge", parents=[str(run.ref)], folder=merged, **record) as m:
            tensors = {k: v.detach() for k, v in llm.model.state_dict().items()}
            files = llm.tokenizer.files()
            save_folder(m.folder, run.plain_config, tensors, files, llm.generation_config)
        out["merged_entry"] = mref
        out["merged_path"] = str(m.folder)
    return out
