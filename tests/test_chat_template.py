"""Chat templates render exactly as transformers' `apply_chat_template` does (live oracle), on a ChatML default,
a Qwen-style template with tools and a Llama-3-style template with a system-message split and raise_exception."""

from __future__ import annotations

import pytest

from lmforge.tokenizers.chat_template import CHATML_TEMPLATE, apply_chat_template, end_of_turn_markers, validate_messages
from lmforge.errors import GenerationError

# Written in the style of Qwen2.5's template: tools as JSON lines inside a system block, tool results wrapped.
QWEN_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Written in the style of Llama 3's template: BOS, a system header, strict alternation checked with
# raise_exception, a namespace counter and loop controls.
LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if date_string is defined %}{{- "Today Date: " + date_string + "\\n\\n" }}{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) and message['role'] != 'tool' %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'tool' %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral-style, written without whitespace control: only trim_blocks/lstrip_blocks keep its layout right.
MISTRAL_STYLE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '[INST] ' + message['content'] + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
{{ message['content'] + eos_token }}
    {% endif %}
{% endfor %}
"""

CHAT = [
    {"role": "system", "content": "  You are terse. "},
    {"role": "user", "content": "Hi! <b>é</b> 日本"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What's 2+2?"},
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add <two> numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, QWEN_STYLE, LLAMA3_STYLE, MISTRAL_STYLE],
                         ids=["chatml", "qwen", "llama3", "mistral"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(hf_tokenizer, template, add_generation_prompt):
    for messages, extra in [(CHAT, {}), (CHAT[1:2], {}), (CHAT, {"date_string": "1 Jan 2026"})]:
        want = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=add_generation_prompt, **extra)
        got = apply_chat_template(messages, template, add_generation_prompt=add_generation_prompt,
                                  bos_token="<s>", eos_token="</s>", **extra)
        assert got == want


def test_tools_render_like_transformers(hf_tokenizer):
    messages = CHAT[1:2] + [{"role": "assistant", "content": "calling add"},
                            {"role": "tool", "content": "4"}, {"role": "tool", "content": "5"}]
    want = hf_tokenizer.apply_chat_template(messages, chat_template=QWEN_STYLE, tools=TOOLS, tokenize=False,
                                            add_generation_prompt=True)
    got = apply_chat_template(messages, QWEN_STYLE, tools=TOOLS, add_generation_prompt=True)
    assert got == want
    assert '"description": "Add <two> numbers"' in got  # tojson does not HTML-escape


def test_chatml_default_layout():
    out = apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert end_of_turn_markers(None) == ["<|im_end|>"]
    assert end_of_turn_markers(LLAMA3_STYLE) == ["<|eot_id|>"]


def test_raise_exception_and_bad_messages_are_one_line_errors():
    with pytest.raises(GenerationError, match="alternate"):
        apply_chat_template([{"role": "assistant", "content": "x"}], LLAMA3_STYLE)
    with pytest.raises(GenerationError, match="unknown chat role 'robot' in message 1"):
        validate_messages([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(GenerationError, match="no 'content'"):
        validate_messages([{"role": "user"}])
    with pytest.raises(GenerationError, match="list"):
        validate_messages("hello")
    with pytest.raises(GenerationError, match="does not parse"):
        apply_chat_template(CHAT, "{% for m in messages %}")


def test_sandbox_blocks_attribute_escape():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(GenerationError):
        apply_chat_template(CHAT, evil)
    mutate = "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages | length }}"
    with pytest.raises(GenerationError):
        apply_chat_template(CHAT, mutate)
