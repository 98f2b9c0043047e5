#!/usr/bin/env bash
# Fetch llama.cpp's vocab-only GGUF files and their reference tokenizations for the tokenizer
# tests (tests/checkpoint/test_gguf_tokenizer.py reads them from $FOLK_TEST_VOCAB_DIR).
#
# They ship in the llama-cpp-python source distribution on PyPI under
# vendor/llama.cpp/models/ggml-vocab-*.gguf{,.inp,.out}. The sdist is downloaded with pip (never
# installed: that would compile llama.cpp) and only those files are extracted.
#
# Usage: tests/data/fetch_vocab.sh TARGET_DIR      (then: export FOLK_TEST_VOCAB_DIR=TARGET_DIR)
set -euo pipefail

target="${1:?usage: $0 TARGET_DIR}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

if compgen -G "$target/ggml-vocab-llama-spm.gguf.out" >/dev/null; then
    echo "vocab files already in $target"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$version" -d "$work"
sdist="$(ls "$work"/llama_cpp_python-*.tar.gz)"
mkdir -p "$work/x" "$target"
tar -xzf "$sdist" -C "$work/x" --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
find "$work/x" -path '*/vendor/llama.cpp/models/ggml-vocab-*' -type f -exec cp {} "$target"/ \;
echo "extracted $(ls "$target" | wc -l) files to $target"
