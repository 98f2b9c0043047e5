"""``torchrun --nproc-per-node 2`` on CPU (gloo): same gradients as one process, same CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, SHAREGPT, folk

STEP = Path(__file__).with_name("ddp_step.py")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            *args]  # fmt: skip


@pytest.mark.slow  # two torchrun worlds (1 and 2 processes)
def test_ddp_gradients_equal_single_process(tiny_chat, tmp_path):
    common = [str(tiny_chat), str(SHAREGPT)]
    _run(
        [
            sys.executable,
            str(STEP),
            *common,
            str(tmp_path / "one.pt"),
            str(tmp_path / "r1"),
            "4",
            "1",
        ]
    )
    _run(
        [
            sys.executable,
            str(STEP),
            *common,
            str(tmp_path / "acc.pt"),
            str(tmp_path / "r2"),
            "2",
            "2",
        ]
    )
    _run(_torchrun(str(STEP), *common, str(tmp_path / "ddp.pt"), str(tmp_path / "r3"), "2", "1"))
    one, acc, ddp = (
        torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "acc.pt", "ddp.pt")
    )
    assert one.keys() == ddp.keys() == acc.keys() and len(one) == 2 * 2 * 7
    for k in one:
        assert one[k].abs().max() > 0, k
        torch.testing.assert_close(ddp[k], one[k], atol=1e-6, rtol=1e-4, msg=k)
        torch.testing.assert_close(acc[k], one[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.slow  # folk tune under torchrun, 2 processes
def test_cli_runs_under_torchrun(tiny_chat, home):
    cmd = _torchrun("-m", "folklm.cli.main", "tune", str(tiny_chat), "--data", str(SHAREGPT),
                    "--out", "ddp:v1", "--json", "max_steps=3", "max_seq_len=96",
                    "batch_size=2", "eval_max_examples=4")  # fmt: skip
    r = _run(cmd)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    assert json.loads(lines[0])["steps"] == 3
    show = json.loads(folk("show", "ddp:v1", "--json").stdout)
    assert show["operation"] == "adapter"
