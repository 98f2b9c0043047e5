"""``finetune()``: one fine-tuning run from model + data + recipe to a registry entry.

The steps ``folk tune`` (and Python users) go through: check the recipe, the output name
and the data before any training; load the base with plain ``nn.Linear`` layers; attach
LoRA / DoRA (over an NF4 base for QLoRA) or unfreeze everything (full); train; save the
adapter in PEFT's format (or the whole model); record it with
:func:`folklm.hub.register.register_model` (parent = the base, the full recipe, the data
file's hash, the seed). Under ``torchrun`` rank 0 alone writes and registers.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from folklm.errors import FolkError
from folklm.tune import distributed as dist_
from folklm.tune.recipe import Recipe


def run_folder(out: str) -> Path:
    from folklm.defaults import folk_home
    from folklm.hub.names import parse_ref

    ref = parse_ref(out)
    return folk_home() / "runs" / f"{ref.name}-{ref.tag}"


def _base_name(model: str) -> tuple[str | None, str]:
    """(registry name of the base or None, what to load)."""
    from folklm.engine.llm import is_registry_name

    if model and not Path(model).expanduser().exists() and is_registry_name(model):
        return model, model
    return None, model


def adapter_config(recipe: Recipe, base: str | None):
    from folklm.checkpoint.peft import AdapterConfig

    return AdapterConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        target_modules=list(recipe.target_modules),
        lora_dropout=recipe.lora_dropout,
        use_rslora=recipe.use_rslora,
        use_dora=recipe.method == "dora",
        base_model_name_or_path=base,
    )


def prepare_model(llm, recipe: Recipe, base: str | None):
    """Attach the trainable part for ``recipe.method``; returns the adapter config or None."""
    from folklm.tune.lora import apply_lora, resolve_targets

    model = llm.model
    if recipe.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    cfg = adapter_config(recipe, base)
    resolve_targets(model, cfg.target_modules)  # a bad name fails before quantizing
    if recipe.method == "qlora":
        from folklm.quant.api import quantize

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
    import folklm
    from folklm.hub.names import parse_ref
    from folklm.tune.data import build_dataset
    from folklm.tune.trainer import split_eval, train

    started = time.time()
    ref = parse_ref(out)
    recipe.validate()
    parent, source = _base_name(model)
    if merge and recipe.method == "full":
        raise FolkError("--merge applies to adapters; a full fine-tune is already a whole model")
    ctx = dist_.context()
    llm = folklm.load(source, dtype="float32", fast=False)
    plain_config = copy.deepcopy(llm.model.config)
    ds = build_dataset(
        data,
        llm.tokenizer,
        recipe.max_seq_len,
        truncate=recipe.truncate,
        pack=recipe.pack,
        preference=recipe.method == "dpo",
    )
    torch.manual_seed(recipe.seed)
    cfg = prepare_model(llm, recipe, parent or str(Path(source).expanduser().resolve()))
    train_ex, eval_ex = split_eval(ds.examples, recipe)
    pad = llm.tokenizer.pad_token_id or 0
    if recipe.method == "dpo":
        from folklm.tune.dpo import DPOTask

        task = DPOTask(recipe.dpo_beta, pad)
    else:
        from folklm.tune.loss import SFTTask

        task = SFTTask(pad)
    run_dir = run_folder(str(ref))
    if not resume and ctx.rank == 0 and run_dir.exists():
        shutil.rmtree(run_dir)
    dist_.barrier(ctx)
    llm.model.train()
    result = train(
        llm.model, recipe, task, train_ex, eval_ex, run_dir, resume=resume, progress=progress
    )
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
        summary.update(
            _save_and_register(
                llm,
                plain_config,
                cfg,
                recipe,
                ref,
                parent,
                source,
                data,
                ds,
                run_dir,
                merge,
                started,
                license,
            )
        )
    dist_.barrier(ctx)
    return summary


def _save_and_register(
    llm, plain_config, cfg, recipe, ref, parent, source, data, ds, run_dir, merge, started, lic
) -> dict[str, Any]:
    from folklm.checkpoint.hf import save_folder
    from folklm.checkpoint.peft import save_adapter
    from folklm.hub.register import register_model
    from folklm.tune.lora import adapter_state, dequantize_linears, merge_lora

    full_recipe = {
        **recipe.to_dict(),
        "base_model": parent or str(source),
        "data_format": ds.format,
        "examples": ds.records,
        "truncated": ds.truncated,
        "dropped": ds.dropped,
    }
    operation = {"full": "finetune", "dpo": "dpo"}.get(recipe.method, "adapter")
    parents = [parent] if parent else []
    out: dict[str, Any] = {}
    if cfg is not None:
        folder = save_adapter(run_dir / "adapter", cfg, adapter_state(llm.model))
        out["adapter_path"] = str(folder)
    else:
        folder = run_dir / "model"
        tensors = {k: v.detach() for k, v in llm.model.state_dict().items()}
        save_folder(folder, plain_config, tensors, llm.tokenizer.files(), llm.generation_config)
        out["model_path"] = str(folder)
    kw = dict(recipe=full_recipe, data_files=[data], seed=recipe.seed, started_at=started)
    entry = register_model(folder, str(ref), operation, parents=parents, license=lic, **kw)
    out["entry"] = entry.name
    if merge:
        merge_lora(llm.model)
        dequantize_linears(llm.model)  # QLoRA: the merged model is dense (NF4 base dequantized)
        mfolder = run_dir / "merged"
        tensors = {k: v.detach() for k, v in llm.model.state_dict().items()}
        save_folder(mfolder, plain_config, tensors, llm.tokenizer.files(), llm.generation_config)
        mref = f"{ref.name}-merged:{ref.tag}"
        # the merged weights come from the adapter entry (which points to the base)
        register_model(mfolder, mref, "merge", parents=[str(ref)], **kw)
        out["merged_entry"] = mref
        out["merged_path"] = str(mfolder)
    return out
