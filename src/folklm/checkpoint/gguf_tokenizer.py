"""Rebuild a Hugging Face ``tokenizers.Tokenizer`` from a GGUF file's ``tokenizer.*`` metadata.

A GGUF file carries no ``tokenizer.json``: llama.cpp stores the vocabulary under the keys of the
GGUF spec (``docs/gguf.md`` in ggml, section "Tokenizer") -- ``tokenizer.ggml.model``,
``.tokens``, ``.token_type``, ``.scores``, ``.merges``, ``.pre`` and the special token ids -- and
tokenizes with its own code (``src/llama-vocab.cpp``). This module rebuilds the equivalent
``tokenizers`` pipeline, following llama.cpp's choices where they differ from a default:

* ``gpt2`` (byte-level BPE: GPT-2, Llama 3, Qwen2, SmolLM, ...): vocabulary spelled in the
  GPT-2 byte alphabet, the file's merges, and the pre-tokenizer regex llama.cpp picks for
  ``tokenizer.ggml.pre`` (``llm_tokenizer_bpe``).
* ``llama`` (SentencePiece BPE: Llama 1/2, Mistral): merges recovered from the piece scores (a
  pair merges when the piece it forms has a high score), byte fallback for ``<0xNN>`` pieces,
  and the ``▁`` space handling of SentencePiece, prepended after every special token as in
  ``llm_tokenizer_spm``.

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
tokens, both matched whole in the raw text as llama.cpp does.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

# llama_token_type in llama.h
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, as in the tokenizer.json of the model family (llama.cpp's copies in
# llm_tokenizer_bpe are the same patterns with the case-insensitive group spelled out).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (split regex or None for GPT-2's, digits one by one, ignore_merges).
# Names absent here get GPT-2's byte-level regex, which is right for "gpt-2" and "default".
_PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"),
        (LLAMA3_SPLIT, False, True),
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), (QWEN2_SPLIT, False, False)
    ),
    "tekken": (TEKKEN_SPLIT, False, True),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), (None, True, False)),
}
# llama.cpp turns BOS on by default for these pre-tokenizers (llama_vocab::impl::load).
_ADD_BOS_BY_DEFAULT = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "tekken"}
_NFC = {"qwen2", "deepseek-r1-qwen", "megrez"}  # Qwen2's tokenizer.json normalizes to NFC


class TokenizerMetadataError(ValueError):
    """The ``tokenizer.*`` metadata is missing or describes a tokenizer folklm cannot rebuild."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (``encoder.py`` of openai/gpt-2)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """Build the tokenizer a GGUF describes.

    Args:
        meta: the file's metadata, keys as in the file (``tokenizer.ggml.tokens``, ...).

    Returns:
        ``(tokenizer, tokenizer_config)``; the config is shaped like ``tokenizer_config.json``:
        ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` (strings or None),
        ``add_bos_token``, ``add_eos_token`` and ``chat_template`` when the file has one.

    Raises:
        TokenizerMetadataError: no vocabulary, or a tokenizer model other than gpt2/llama.
    """
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise TokenizerMetadataError("no tokenizer.ggml.model / tokenizer.ggml.tokens metadata")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerMetadataError(
            f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    pre_name = meta.get("tokenizer.ggml.pre") or "default"
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(tokens, types, meta, pre_name)
        add_bos_default = pre_name in _ADD_BOS_BY_DEFAULT
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(tokens, meta)
        add_bos_default = True
    else:
        raise TokenizerMetadataError(
            f"unsupported tokenizer model {kind!r}; folklm rebuilds 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece BPE)"
        )
    _add_special_tokens(tokenizer, tokens, types)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    if config["bos_token"] is None:
        config["add_bos_token"] = False
    if config["eos_token"] is None:
        config["add_eos_token"] = False
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    _set_post_processor(tokenizer, config, meta, byte_level=kind == "gpt2")
    return tokenizer, config


def _byte_level_bpe(tokens: list[str], types: list[int], meta: dict, pre_name: str) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        # Added tokens are stored as raw text; a regular token outside the byte alphabet is a
        # converter slip, respelled so that the merges can reach it.
        if kind not in (CONTROL, USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or ():
        left, _, right = merge.partition(" ")
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    split, digits, ignore_merges = _PRE_TOKENIZERS.get(pre_name, (None, False, False))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    steps: list[pre.PreTokenizer]
    if split is None:
        steps = [pre.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [
            pre.Split(Regex(split), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    if digits:
        steps.insert(0, pre.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre.Sequence(steps) if len(steps) > 1 else steps[0]
    if pre_name in _NFC:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece piece scores.

    SentencePiece BPE repeatedly joins the adjacent pair whose joined piece has the highest
    score; a rank-ordered merge list reproduces that when every split ``(l, r)`` of a piece is
    ranked by the piece's score (ties: longer left part first, then vocabulary order), which is
    also the order ``transformers`` derives.
    """
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(tokens: list[str], meta: dict) -> Tokenizer:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    raw_scores = meta.get("tokenizer.ggml.scores")
    scores: dict[str, float] = {}
    for i, tok in enumerate(tokens):
        if vocab[tok] == i:
            scores[tok] = float(raw_scores[i]) if raw_scores else -float(i)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    if unk is None and "<unk>" in vocab:
        unk = "<unk>"
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=sentencepiece_merges(vocab, scores),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = []
    if meta.get("tokenizer.ggml.remove_extra_whitespaces"):
        steps += [normalizers.Strip(), normalizers.Replace(Regex(r" {2,}"), " ")]
    if prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> None:
    vocab = tokenizer.get_vocab()
    special = []
    user = []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if vocab.get(tok) != i:  # a duplicate spelling; keep the first id
            continue
        if kind == CONTROL:
            special.append(AddedToken(tok, special=True, normalized=False))
        elif kind == USER_DEFINED:
            user.append(AddedToken(tok, special=False, normalized=False))
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)


def _set_post_processor(
    tokenizer: Tokenizer, config: dict[str, Any], meta: dict, *, byte_level: bool
) -> None:
    steps: list[processors.PostProcessor] = (
        [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    )
    if config["add_bos_token"] or config["add_eos_token"]:
        bos, eos = config["bos_token"], config["eos_token"]
        head = [bos] if config["add_bos_token"] else []
        tail = [eos] if config["add_eos_token"] else []
        special = [
            (t, meta[f"tokenizer.ggml.{k}_token_id"])
            for t, k in ((bos, "bos"), (eos, "eos"))
            if t is not None and t in head + tail
        ]
        steps.append(
            processors.TemplateProcessing(
                single=[*head, "$A", *tail],
                pair=[*head, "$A", *tail, *head, "$B", *tail],
                special_tokens=special,
            )
        )
    if len(steps) == 1:
        tokenizer.post_processor = steps[0]
    elif steps:
        tokenizer.post_processor = processors.Sequence(steps)
