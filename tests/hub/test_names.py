"""Registry references: ``name[:tag]`` parsing and the checks that keep names out of paths."""

from __future__ import annotations

import pytest

from folklm.errors import FolkError
from folklm.hub.names import ModelRef, parse_ref, suggest_ref


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("llama-3-tune", ModelRef("llama-3-tune", "latest")),
        ("smollm2-135m-instruct:q4_1", ModelRef("smollm2-135m-instruct", "q4_1")),
        ("Qwen2.5-Coder:0.5B", ModelRef("qwen2.5-coder", "0.5b")),  # case-insensitive
        ("a:b_c-d.e", ModelRef("a", "b_c-d.e")),
    ],
)
def test_valid_references(text, ref):
    assert parse_ref(text) == ref
    assert str(parse_ref(text)) == f"{ref.name}:{ref.tag}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("models/llama", "'/'"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("my model", "space"),
        ("tab\there", "control character"),
        ("bell\x07", "control character"),
        ("", "empty"),
        ("name:", "empty"),
        (":tag", "empty"),
        ("a:b:c", "more than one ':'"),
        ("-dash", "starting with a letter or digit"),
        (".hidden", "starting with a letter or digit"),
        ("x" * 81, "longer than 80"),
        ("naïve", "use letters, digits"),
        ("back\\slash", "'\\\\'"),
    ],
)
def test_invalid_references_are_one_line_errors(text, why):
    with pytest.raises(FolkError) as e:
        parse_ref(text)
    message = str(e.value)
    assert why in message and "\n" not in message, message
    assert message.startswith("invalid model")


def test_control_characters_are_shown_escaped():
    with pytest.raises(FolkError, match=r"'bell\\x07'"):
        parse_ref("bell\x07")


@pytest.mark.parametrize(
    ("stem", "ref"),
    [
        ("SmolLM2-135M-Instruct.Q4_1", ModelRef("smollm2-135m-instruct", "q4_1")),
        ("Meta-Llama-3.1-8B-Instruct-Q4_K_M", ModelRef("meta-llama-3.1-8b-instruct", "q4_k_m")),
        ("mistral-7b.f16", ModelRef("mistral-7b", "f16")),
        ("My Model (copy)", ModelRef("my-model-copy", "latest")),
        ("...", ModelRef("model", "latest")),
    ],
)
def test_names_suggested_from_file_names_are_valid(stem, ref):
    assert suggest_ref(stem) == ref
    assert parse_ref(str(ref)) == ref
