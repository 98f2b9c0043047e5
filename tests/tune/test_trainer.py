"""Training loop: fused loss vs float64 autograd, schedule, kill -9 + resume, CLI runs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import folklm
from folklm.tune.loss import linear_cross_entropy
from folklm.tune.recipe import Recipe, build_recipe
from folklm.tune.trainer import DataStream, lr_factor

from .conftest import ALPACA, ROOT, SHAREGPT, folk


@pytest.mark.parametrize("head_trainable", [False, True])
def test_fused_linear_cross_entropy_matches_float64_autograd(head_trainable):
    torch.manual_seed(0)
    N, C, V = 700, 24, 300  # N spans two chunks
    h = torch.randn(N, C, requires_grad=True)
    W = torch.randn(V, C, requires_grad=head_trainable)
    y = torch.randint(0, V, (N,))
    ours = linear_cross_entropy(h, W, y)
    (ours.sum() * 0.5).backward()
    h64 = h.detach().double().requires_grad_()
    W64 = W.detach().double().requires_grad_(head_trainable)
    ref = torch.nn.functional.cross_entropy(h64 @ W64.T, y, reduction="none")
    (ref.sum() * 0.5).backward()
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    if head_trainable:
        torch.testing.assert_close(W.grad.double(), W64.grad, atol=1e-4, rtol=1e-4)


def test_schedule_and_stream():
    r = Recipe(warmup_steps=4, max_steps=20, schedule="cosine")
    f = [lr_factor(s, r) for s in range(20)]
    assert f[:4] == [0.2, 0.4, 0.6, 0.8] and f[4] == 1.0
    assert f[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert lr_factor(19, Recipe(warmup_steps=0, max_steps=20, schedule="linear")) == 1 - 19 / 20
    s = DataStream(7, seed=3)
    first, second = [s[k] for k in range(7)], [s[k] for k in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert [DataStream(7, 3)[k] for k in range(14)] == first + second


def test_recipe_yaml_and_overrides(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("lora_rank: 4\ntarget_modules: [q_proj, v_proj]\nbf16: true\n")
    r = build_recipe(y, ["lr=1e-3", "max_steps=7", "target_modules=all-linear"], "dora")
    assert (r.lora_rank, r.lr, r.max_steps, r.method, r.bf16) == (4, 1e-3, 7, "dora", True)
    assert r.target_modules == ["all-linear"]


TRAIN = ["max_seq_len=128", "batch_size=4", "lr=5e-3", "warmup_steps=3", "eval_max_examples=8"]


def _run_dir(home, out):
    name, tag = out.split(":")
    return home / "runs" / f"{name}-{tag}"


@pytest.mark.slow  # three training runs in subprocesses
def test_kill_and_resume_gives_same_weights(tiny_chat, home, monkeypatch):
    # MKL's default results may depend on the memory alignment of its inputs, which differs
    # between processes; its conditional-numerical-reproducibility mode makes the three runs
    # below comparable bit for bit (a full-suite run once differed at 1e-5 without it).
    monkeypatch.setenv("MKL_CBWR", "AUTO,STRICT")
    args = [str(tiny_chat), "--data", str(ALPACA), "--no-progress", "--json"]
    args += [*TRAIN, "max_steps=30", "save_every=4", "lora_dropout=0.1", "seed=5"]
    full = folk("tune", *args, "--out", "whole:v1")
    assert full.returncode == 0, full.stderr

    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "folklm.cli.main", "tune", *args, "--out", "cut:v1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = _run_dir(home, "cut:v1") / "metrics.jsonl"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            steps = [r["step"] for r in rows if r["type"] == "train"]
            if steps and steps[-1] >= 10:
                proc.send_signal(signal.SIGKILL)
                killed_at = steps[-1]
                break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert killed_at is not None and killed_at < 30
    assert not (_run_dir(home, "cut:v1") / "adapter").exists()
    assert folk("show", "cut:v1").returncode != 0  # nothing registered

    resumed = folk("tune", *args, "--out", "cut:v1", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert 8 <= summary["resumed_from"] <= killed_at
    a = load_file(str(_run_dir(home, "whole:v1") / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(_run_dir(home, "cut:v1") / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    loss = lambda run: [  # noqa: E731
        r["loss"]
        for r in map(json.loads, (_run_dir(home, run) / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "train"
    ]
    assert loss("whole:v1") == loss("cut:v1") and len(loss("cut:v1")) == 30


@pytest.mark.slow  # a real training run per method
@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "full"])
def test_methods_learn_and_register(tiny_chat, home, method):
    out = f"tiny-{method}:v1"
    imp = folk("import", str(tiny_chat), "--name", "tiny-base:v1", "--license", "apache-2.0")
    assert imp.returncode == 0, imp.stderr
    extra = ["--merge"] if method in ("lora", "qlora") else []
    extra.append("bf16=true" if method == "dora" else "seed=0")
    r = folk(
        "tune", "tiny-base:v1", "--data", str(SHAREGPT), "--method", method, "--out", out,
        "--json", *TRAIN, "max_steps=12", "eval_every=6", *extra,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["eval_loss"] < s["eval_loss_before"] - 0.3
    run = _run_dir(home, out)
    assert (run / "loss.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if x["type"] == "train"] == list(range(1, 13))
    show = json.loads(folk("show", out, "--json").stdout)
    assert show["operation"] == ("finetune" if method == "full" else "adapter")
    assert show["recipe"]["method"] == method and show["recipe"]["max_steps"] == 12
    assert show["data_files"][0]["sha256"] and show["seed"] == 0
    assert [p["name"] for p in show["parents"]] == ["tiny-base:v1"]
    assert show["license"]["expression"].lower() == "apache-2.0"  # inherited
    if method != "full":
        assert show["format"] == "adapter"
        cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "tiny-base:v1" and cfg["r"] == 8
        assert cfg["use_dora"] == (method == "dora")
    if method == "qlora":  # the merged model is dense: the NF4 base dequantized + adapter
        merged = folklm.load(s["merged_entry"], fast=False, dtype="float32")
        assert all(type(m).__name__ != "NF4Linear" for m in merged.model.modules())
        assert torch.isfinite(merged.model(torch.tensor([[5, 17, 3]]))).all()
    if method == "lora":
        assert s["merged_entry"] == "tiny-lora-merged:v1"
        merged = json.loads(folk("show", "tiny-lora-merged:v1", "--json").stdout)
        assert [p["name"] for p in merged["parents"]] == [out]
        # the adapter entry loads as base + fused adapter, equal to the merged model
        ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
        a = folklm.load(out, fast=False, dtype="float32").model(ids)
        b = folklm.load("tiny-lora-merged:v1", fast=False, dtype="float32").model(ids)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _grads_and_saved(model, ids: torch.Tensor) -> tuple[dict, int, int]:
    """Full-model gradients of the next-token loss, the bytes autograd saved for backward,
    and how many times the decoder layers' MLPs started (forward + any recomputation; a
    recomputation stops early once it has what backward needs, so pre-hooks count it)."""
    runs = [0]

    def count(*_):
        runs[0] += 1

    hooks = [layer.mlp.register_forward_pre_hook(count) for layer in model.model.layers]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, saved[0], runs[0]


def test_activation_checkpointing_same_gradients_less_saved(tiny_chat):
    """Checkpointed layers (plain nn.Linear, as ``folk tune`` loads the base) give the
    gradients of the plain model (within 1e-6), keep fewer
    activations for the backward pass, and run each layer's forward a second time."""
    from folklm.tune.trainer import enable_activation_checkpointing

    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(3))
    plain = folklm.load(tiny_chat, dtype="float32", fast=False).model.train()
    checked = folklm.load(tiny_chat, dtype="float32", fast=False).model.train()
    enable_activation_checkpointing(checked)
    g0, saved0, runs0 = _grads_and_saved(plain, ids)
    g1, saved1, runs1 = _grads_and_saved(checked, ids)
    layers = len(plain.model.layers)
    assert runs0 == layers and runs1 == 2 * layers  # recomputed in the backward pass
    assert saved1 < saved0 / 2, (saved1, saved0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters()))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-6, msg=name)
