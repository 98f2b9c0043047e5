"""Peak memory of a streamed 3-model TIES merge: at most 1.5x one model's weights.

The models are ~360 MB each so that the interpreter (python + torch, ~220 MB) does not
dominate; the merge runs in a fresh ``folk merge`` process, which reports its own peak
(``VmHWM``). Loading the three models fully would need about 3x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mergetest import write_random_llama


@pytest.mark.slow  # three large random models written and merged in a subprocess
def test_three_model_ties_merge_peaks_below_one_and_a_half_models(tmp_path):
    sizes = [write_random_llama(tmp_path / f"m{i}", layers=6, seed=i) for i in range(3)]
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {tmp_path / 'm0'}\nmodels:\n"
        f"  - model: {tmp_path / 'm1'}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {tmp_path / 'm2'}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
    )
    # One thread: the result does not depend on it, and shared CI cores run it faster.
    env = {**os.environ, "FOLK_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", "merge", str(recipe), "--out", "big:v1"]
        + ["--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    model = max(sizes)
    assert out["largest_input_bytes"] == model
    assert out["bytes_written"] == model
    print(f"peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB, one model {model / 2**20:.0f} MiB")
    assert 0 < out["peak_rss_bytes"] <= 1.5 * model
    assert out["peak_rss_over_model"] == round(out["peak_rss_bytes"] / model, 3)
