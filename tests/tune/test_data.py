"""Data formats, assistant-only masks (checked against transformers), packing, bad input."""

from __future__ import annotations

import gzip
import json

import pytest

from folklm import datasets
from folklm.errors import FolkError
from folklm.tokenizer import Tokenizer
from folklm.tune.data import IGNORE, build_dataset, detect_format, encode_chat, read_records

SHAREGPT = datasets.path("sharegpt_dummy_conversation/dummy_conversation.json")
ALPACA = datasets.path("alpaca_tiny/alpaca_tiny.json")
HH = datasets.path("hh_rlhf_harmless_base_test/harmless-base/test.jsonl.gz")

# SmolLM2's own template with transformers' {% generation %} marks around assistant text.
MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    from folklm.hub.defaults import default_model_folder

    return Tokenizer.from_folder(default_model_folder())


def test_assistant_mask_token_by_token_matches_transformers(smol_tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=smol_tok.hf)
    hf.chat_template = MARKED
    # the model's own (unmarked) template renders the same text
    conv = json.loads(SHAREGPT.read_text())[0]["conversations"]
    roles = {"human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in conv]
    assert smol_tok.apply_chat_template(messages, False) == hf.apply_chat_template(
        messages, tokenize=False
    )
    ids, labels = encode_chat(smol_tok, messages)
    ref = hf.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(ref["input_ids"])
    ours = [int(lab != IGNORE) for lab in labels]
    assert ours == list(ref["assistant_masks"])
    assert sum(ours) > 10 and 0 in ours
    assert all(lab in (IGNORE, tid) for lab, tid in zip(labels, ids, strict=True))
    # the targets are exactly the two answers and their end-of-turn markers
    target = smol_tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=False)
    assert target == "".join(m["content"] + "<|im_end|>\n" for m in messages[1::2])


def test_formats_detected(smol_tok, tmp_path):
    assert build_dataset(SHAREGPT, smol_tok, 256).format == "sharegpt"
    assert build_dataset(ALPACA, smol_tok, 512).format == "alpaca"
    openai = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    openai.write_text(json.dumps({"messages": msgs}) + "\n")
    ds = build_dataset(openai, smol_tok, 128)
    assert ds.format == "openai" and len(ds.examples) == 1
    text = tmp_path / "t.txt"
    text.write_text("word " * 300)
    ds = build_dataset(text, smol_tok, 64)
    assert ds.format == "text" and all(len(e.input_ids) == 64 for e in ds.examples)
    assert ds.examples[0].labels == ds.examples[0].input_ids


@pytest.mark.slow  # the real tokenizer over the HH-RLHF test file
def test_hh_rlhf_pairs(smol_tok):
    records = read_records(HH)
    assert len(records) == 2312 and detect_format(HH, records) == "hh-rlhf"
    ds = build_dataset(HH, smol_tok, 512)
    ex = ds.examples[0]
    first = json.loads(gzip.open(HH).readline())
    last_chosen = first["chosen"].rsplit("\n\nAssistant: ", 1)[1]
    assert smol_tok.decode(ex.chosen_ids, skip_special_tokens=False) == last_chosen + "<|im_end|>\n"
    prompt = smol_tok.decode(ex.prompt_ids, skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "what are some pranks" in prompt
    assert len(ds.examples) + ds.dropped == 2312


def test_truncate_or_drop_counts(smol_tok):
    cut = build_dataset(ALPACA, smol_tok, 96, truncate=True)
    drop = build_dataset(ALPACA, smol_tok, 96, truncate=False)
    assert cut.truncated > 0 and drop.dropped == cut.truncated + cut.dropped
    assert max(len(e.input_ids) for e in cut.examples) == 96
    assert len(drop.examples) == 100 - drop.dropped


def test_packing_keeps_tokens_and_labels(smol_tok):
    plain = build_dataset(SHAREGPT, smol_tok, 256)
    packed = build_dataset(SHAREGPT, smol_tok, 256, pack=True)
    assert len(packed.examples) < len(plain.examples) / 2
    assert max(len(e.input_ids) for e in packed.examples) <= 256
    flat = [t for e in plain.examples for t in e.labels]
    assert [t for e in packed.examples for t in e.labels] == flat


@pytest.mark.parametrize(
    "content,match",
    [
        ('[{"a": 1}, {"b": 2}]', r"bad\.json:1: record 1 fits no known format \(keys: a\)"),
        (
            '[\n {"instruction": "x", "output": "y"},\n {"foo": "bar"}\n]',
            r"bad\.json:3: record 2 fits no known format.*expected the alpaca format",
        ),
        ("[]", "the data set is empty"),
        (
            '{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}',
            r"bad\.json:1: record 1: turn 2 has unknown role 'robot'",
        ),
        ('{"messages": [{"role": "user", "content": 5}]}', "field 'content' must be a string"),
        ("{not json", r"bad\.json:1: not valid JSON"),
    ],
)
def test_bad_input_one_line(smol_tok, tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FolkError, match=match) as info:
        build_dataset(path, smol_tok, 128)
    assert "\n" not in str(info.value)
