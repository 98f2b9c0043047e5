"""Peak memory of a streamed 3-model merge, against the size of one model.

Writes three random Llama-architecture models of a few hundred MB (float32, Hugging Face
format) into a temporary folder, runs ``folk merge`` on them in a fresh process for each
method, and reads the merge's peak RSS (``getrusage`` ru_maxrss of that process, reported
by ``folk merge --json``); also the peak of a process that only imports folklm and torch
(the interpreter baseline) and of one that loads the three models fully with
``safetensors.torch.load_file`` (what a non-streaming merge holds at least). Peaks are
``VmHWM`` of each process (``ru_maxrss`` of a child would include its parent's peak on Linux).

    PYTHONPATH=$PWD/src python bench/merge_memory.py [--layers 6] [--methods ties,linear]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 8192,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

RECIPES = {
    "ties": "merge_method: ties\nbase_model: {m0}\nmodels:\n"
    "  - model: {m1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    "  - model: {m2}\n    parameters: {{weight: 1.0, density: 0.5}}\ndtype: float32\n",
    "linear": "merge_method: linear\nmodels:\n  - model: {m0}\n    parameters: {{weight: 1}}\n"
    "  - model: {m1}\n    parameters: {{weight: 1}}\n"
    "  - model: {m2}\n    parameters: {{weight: 1}}\ndtype: float32\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {m0}\nmodels:\n"
    "  - model: {m1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    "  - model: {m2}\n    parameters: {{weight: 1.0, density: 0.5}}\ndtype: float32\n",
}


def write_random_model(folder: Path, layers: int, seed: int) -> int:
    """A random Llama model written tensor by tensor; returns its weight bytes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    cfg = {**CONFIG, "num_hidden_layers": layers}
    (folder / "config.json").write_text(json.dumps(cfg))
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    shapes["lm_head.weight"] = (v, h)
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            **{p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"},
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * 4 for t in tensors.values())


def peak_of(code: str, env: dict) -> int:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code + "\nfrom folklm.merge.executor import peak_rss_bytes\nprint(peak_rss_bytes())",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--methods", default="ties,linear")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="merge-mem-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "FOLK_HOME": str(root / "home")}
        sizes = [write_random_model(root / f"m{k}", args.layers, k) for k in range(3)]
        model_bytes = max(sizes)
        baseline = peak_of("import torch, folklm.merge, folklm.cli.main", env)
        full = peak_of(
            "from safetensors.torch import load_file\n"
            f"ms=[load_file('{root}/m{{}}/model.safetensors'.format(k)) for k in range(3)]\n"
            "[t.add_(0) for m in ms for t in m.values()]",
            env,
        )
        rows = []
        for method in args.methods.split(","):
            recipe = root / f"{method}.yaml"
            models = {f"m{k}": root / f"m{k}" for k in range(3)}
            recipe.write_text(RECIPES[method].format(**models))
            t0 = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "folklm.cli.main",
                    "merge",
                    str(recipe),
                    "--out",
                    f"mem-{method}:v1",
                    "--json",
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                sys.exit(proc.stderr)
            out = json.loads(proc.stdout)
            rows.append(
                {
                    "method": method,
                    "peak_rss_bytes": out["peak_rss_bytes"],
                    "ratio_to_model": round(out["peak_rss_bytes"] / model_bytes, 3),
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
    print(f"one model: {model_bytes / 2**20:,.0f} MiB of float32 weights, 3 inputs")
    print(
        f"baseline (python + torch + folklm imported): {baseline / 2**20:,.0f} MiB "
        f"({baseline / model_bytes:.2f}x)"
    )
    print(
        f"loading the 3 models fully (safetensors load_file): {full / 2**20:,.0f} MiB "
        f"({full / model_bytes:.2f}x)"
    )
    for r in rows:
        print(
            f"folk merge {r['method']:>10}: peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB = "
            f"{r['ratio_to_model']:.2f}x one model, {r['wall_s']} s wall"
        )
    print(
        json.dumps(
            {
                "bench": "merge_memory",
                "model_bytes": model_bytes,
                "baseline_rss_bytes": baseline,
                "full_load_rss_bytes": full,
                "merges": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
