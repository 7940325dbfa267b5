"""Chat templates: how a list of messages becomes the one string a language model actually reads.

A chat model is still a next-token predictor. What makes it "chat" is a fixed text layout it saw during
fine-tuning, for example ChatML (used by Qwen and by lmforge's own chat fine-tunes):

    <|im_start|>system
    You are terse.<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant
                                  <- the model continues from here and ends its turn with <|im_end|>

Llama 3 uses `<|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>` instead. Feeding a model a layout it was
not trained on works badly, so the layout travels with the model as a Jinja template (Hugging Face stores it in
tokenizer_config.json or chat_template.jinja; lmforge in chat_template.jinja). `add_generation_prompt=True`
appends the header of an assistant turn so the model answers instead of continuing the user's message.

We render exactly as Hugging Face's `apply_chat_template` does, so templates from the Hub work unchanged: a
sandboxed, immutable Jinja environment (templates are untrusted code downloaded with a model) with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension (`{% break %}`), a `tojson` filter that does not
HTML-escape, and the globals `raise_exception(msg)` and `strftime_now(fmt)`. Variables a template can read:
`messages`, `tools`, `documents`, `add_generation_prompt`, `bos_token`, `eos_token` and any extra keyword.
The rendered text already contains the BOS token if the template writes `{{ bos_token }}`, so it is tokenized
without adding BOS again (as Hugging Face does with `add_special_tokens=False`).

Reference: https://huggingface.co/docs/transformers/chat_templating
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

from lmforge.errors import GenerationError

# ChatML, the default for lmforge chat models (and what Qwen2 models use). Same text as Hugging Face's ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = ("system", "developer", "user", "assistant", "tool")

# Text that ends an assistant turn in common templates; generation stops there (see `end_of_turn_markers`).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check roles and contents; return plain dicts. Raises `GenerationError` naming the bad message.

    >>> validate_messages([{"role": "user", "content": "Hi"}])
    [{'role': 'user', 'content': 'Hi'}]
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise GenerationError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise GenerationError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise GenerationError(f"unknown chat role {role!r} in message {i}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise GenerationError(f"message {i} ({role}) has no 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise GenerationError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        out.append(dict(m))
    return out


@lru_cache(maxsize=32)
def _compile(template: str):
    """Compile a template in a sandbox set up like Hugging Face's (cached: templates are reused per request)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes '<' and '>', which would change tool schemas shown to the model
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise GenerationError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def apply_chat_template(
    messages: Sequence[Mapping[str, Any]],
    template: str | None = None,
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` to the prompt string (Hugging Face `apply_chat_template(..., tokenize=False)` semantics).

    template: a Jinja string; None means ChatML (`CHATML_TEMPLATE`).
    >>> apply_chat_template([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    import jinja2

    messages = validate_messages(messages)
    compiled = _compile(template if template is not None else CHATML_TEMPLATE)
    try:
        return compiled.render(messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                               eos_token=eos_token, **kwargs)
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...) in the template, or a sandbox violation
        raise GenerationError(f"chat template error: {e}") from None


def end_of_turn_markers(template: str | None) -> list[str]:
    """The end-of-turn strings a template writes (where a generated assistant turn must stop).

    >>> end_of_turn_markers(None)
    ['<|im_end|>']
    """
    text = template if template is not None else CHATML_TEMPLATE
    return [m for m in END_OF_TURN_MARKERS if m in text]
