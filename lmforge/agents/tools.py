"""Tools: typed Python functions a model may call, described to it as JSON schemas.

A model cannot run code. What it can do is write, instead of an answer, a *request*: "call `calculator` with
`{"expression": "17*23"}`". The program around the model (the agent loop, `loop.py`) runs the function and sends
the result back as a new message, and the model continues from there. For the model to write such a request it
must know which functions exist and what arguments they take. OpenAI's function-calling format describes each one
as a name, a description and a JSON Schema of its parameters:

    {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "..."}},
                    "required": ["expression"], "additionalProperties": false}}}

Writing those schemas by hand is error-prone, and they drift from the code. Here they are *derived* from a typed
Python function: the signature gives the properties and which are required (no default), the annotations their
JSON types, and the docstring the description (its first paragraph) and each parameter's description (a
Google-style `Args:` section). This is what the `openai-agents` SDK and LangChain's `@tool` do.

    @tool
    def add(a: int, b: int = 0) -> int:
        '''Add two integers.

        Args:
            a: the first term
            b: the second term
        '''
        return a + b

    add.schema()             # the OpenAI tool dict above, for `add`
    add.run({"a": 2})        # Observation(content='2', ok=True, ...)

Running a call never raises. Arguments are checked against the schema first (a wrong type or a missing argument
is a model mistake, not a crash), the function runs in a worker thread under a time limit, and any exception it
raises becomes the text of an error observation that the model reads at its next step ("error: ..."). A thread
cannot be killed in Python, so a tool that overruns its limit is abandoned, not stopped: tools must bound their own
work (the built-in ones do: `builtin.py`), and the limit is what keeps the *loop* going.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import re
import threading
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence, get_args, get_origin

from lmforge.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_OBSERVATION_CHARS = 8000  # a tool result longer than this is cut (the model's context is small)


class ToolError(Exception):
    """Raised by a tool to report a problem to the model (the message becomes the observation). Not an
    LmforgeError: it is the *model's* mistake, shown to the model, not the user's."""


@dataclass
class Observation:
    """The outcome of one tool call, as the model will read it."""

    content: str
    ok: bool
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"content": self.content, "ok": self.ok, "seconds": round(self.seconds, 6)}


# ---------------------------------------------------------------------------------------------------------------
# Python annotations -> JSON Schema
# ---------------------------------------------------------------------------------------------------------------
def json_type(annotation: Any) -> dict[str, Any]:
    """The JSON Schema of a Python annotation (the types a model can write in JSON).

    >>> json_type(int), json_type(list[str]), json_type(Literal["a", "b"])
    ({'type': 'integer'}, {'type': 'array', 'items': {'type': 'string'}}, {'type': 'string', 'enum': ['a', 'b']})
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        raise ConfigError("every tool parameter needs a type annotation (str, int, float, bool, list[...], Literal)")
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}
    if annotation in simple:
        return {"type": simple[annotation]}
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or next(iter(kinds)) not in (str, int):
            raise ConfigError(f"Literal tool parameters must be all str or all int, got {annotation!r}")
        return {"type": simple[next(iter(kinds))], "enum": list(args)}
    if origin in (list, collections.abc.Sequence):
        return {"type": "array", "items": json_type(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:  # Optional[X]: X or null
            inner = json_type(rest[0])
            return {**inner, "type": [inner["type"], "null"]} if "type" in inner else inner
    raise ConfigError(f"unsupported tool parameter type {annotation!r}: use str, int, float, bool, list[...], "
                      f"dict, Literal[...] or Optional[...]")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style docstring.

    >>> parse_docstring('''Add numbers.
    ...
    ...     Args:
    ...         a: first term
    ...         b (int): second
    ...             term
    ...     ''')
    ('Add numbers.', {'a': 'first term', 'b': 'second term'})
    """
    doc = inspect.cleandoc(doc or "")
    lines = doc.splitlines()
    desc_lines: list[str] = []
    params: dict[str, str] = {}
    i = 0
    while i < len(lines) and lines[i].strip() not in ("Args:", "Arguments:", "Parameters:"):
        desc_lines.append(lines[i])
        i += 1
    description = "\n".join(desc_lines).split("\n\n")[0].strip().replace("\n", " ")
    current = None
    for line in lines[i + 1:]:
        if line.strip() and not line.startswith((" ", "\t")):  # next section (Returns:, ...)
            break
        m = re.match(r"\s+(\w+)\s*(\([^)]*\))?\s*:\s*(.*)", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= params.get("__indent__", 99)):
            current = m.group(1)
            params["__indent__"] = len(line) - len(line.lstrip())
            params[current] = m.group(3).strip()
        elif current and line.strip():
            params[current] = (params[current] + " " + line.strip()).strip()
    params.pop("__indent__", None)
    return description, params


# ---------------------------------------------------------------------------------------------------------------
# Checking a model's arguments against the schema (the subset `json_type` produces)
# ---------------------------------------------------------------------------------------------------------------
def check_arguments(schema: Mapping[str, Any], args: Any) -> str | None:
    """None if `args` fits the object schema, else a one-line reason the model can act on.

    >>> s = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
    ...      "additionalProperties": False}
    >>> check_arguments(s, {"a": 1}), check_arguments(s, {}), check_arguments(s, {"a": "1"})
    (None, "missing required argument 'a'", "argument 'a' must be integer, got string")
    """
    if not isinstance(args, dict):
        return f"arguments must be a JSON object, got {_json_kind(args)}"
    props = schema.get("properties", {})
    if schema.get("additionalProperties") is False:  # first: a misspelled name explains the missing one
        extra = sorted(set(args) - set(props))
        if extra:
            return f"unknown argument {extra[0]!r}; expected {', '.join(props) or 'none'}"
    for name in schema.get("required", []):
        if name not in args:
            return f"missing required argument {name!r}"
    for name, value in args.items():
        if name in props:
            why = _check_value(props[name], value)
            if why:
                return f"argument {name!r} {why}"
    return None


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _check_value(schema: Mapping[str, Any], v: Any) -> str | None:
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    kind = _json_kind(v)
    if types and kind not in types and not (kind == "integer" and "number" in types):
        return f"must be {' or '.join(types)}, got {kind}"
    if kind == "string" and isinstance(schema.get("maxLength"), int) and len(v) > schema["maxLength"]:
        return f"is longer than {schema['maxLength']} characters"
    if "enum" in schema and v not in schema["enum"]:
        return f"must be one of {schema['enum']}, got {v!r}"
    if kind == "array" and "items" in schema:
        for item in v:
            why = _check_value(schema["items"], item)
            if why:
                return f"item {why}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Tool
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Tool:
    """A callable the model may use: its name, description, parameter schema and the Python function."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    timeout: float = 10.0
    max_chars: int = MAX_OBSERVATION_CHARS
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not NAME_RE.fullmatch(self.name):
            raise ConfigError(f"tool name {self.name!r} must be 1-64 letters, digits, _ or -")
        if self.timeout <= 0:
            raise ConfigError(f"tool {self.name}: timeout must be > 0 seconds, got {self.timeout}")

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry for this tool."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, *args, **kwargs):  # a decorated function stays callable as Python
        return self.fn(*args, **kwargs)

    def run(self, arguments: Any, timeout: float | None = None) -> Observation:
        """Check the arguments, run the function under the time limit; never raises."""
        t0 = time.perf_counter()
        why = check_arguments(self.parameters, arguments)
        if why:
            return Observation(f"error: {self.name}: {why}", False, time.perf_counter() - t0)
        limit = self.timeout if timeout is None else min(self.timeout, timeout)
        box: dict[str, Any] = {}

        def work():
            try:
                box["value"] = self.fn(**arguments)
            except ToolError as e:
                box["error"] = str(e)
            except Exception as e:  # noqa: BLE001 -- any failure of a tool is reported to the model, by design
                box["error"] = f"{type(e).__name__}: {e}"

        worker = threading.Thread(target=work, name=f"tool-{self.name}", daemon=True)
        worker.start()
        worker.join(max(limit, 0.0))
        seconds = time.perf_counter() - t0
        if worker.is_alive():
            return Observation(f"error: {self.name} timed out after {limit:.2g} s", False, seconds)
        if "error" in box:
            return Observation(f"error: {self.name}: {box['error']}", False, seconds)
        return Observation(self._text(box.get("value")), True, seconds)

    def _text(self, value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if len(text) > self.max_chars:
            text = text[:self.max_chars] + f"\n[... cut: {len(text) - self.max_chars} more characters]"
        return text


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float = 10.0) -> Any:
    """Make a `Tool` from a typed function (usable bare, `@tool`, or with options, `@tool(timeout=2)`)."""

    def make(f: Callable) -> Tool:
        return function_tool(f, name=name, description=description, timeout=timeout)

    return make(fn) if fn is not None else make


def function_tool(fn: Callable, *, name: str | None = None, description: str | None = None,
                  timeout: float = 10.0) -> Tool:
    """The `Tool` for `fn`: schema from its signature and docstring (see the module docstring)."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # noqa: BLE001 -- unresolvable annotations are the user's to fix
        raise ConfigError(f"tool {fn.__name__}: cannot read its type annotations ({e})") from None
    doc_desc, doc_params = parse_docstring(fn.__doc__)
    props: dict[str, Any] = {}
    required: list[str] = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ConfigError(f"tool {fn.__name__}: *args/**kwargs cannot be described to a model")
        try:
            prop = json_type(hints.get(p.name, p.annotation))
        except ConfigError as e:
            raise ConfigError(f"tool {fn.__name__}, parameter {p.name!r}: {e}") from None
        if p.name in doc_params:
            prop["description"] = doc_params[p.name]
        if p.default is p.empty:
            required.append(p.name)
        elif p.default is not None:
            prop["default"] = p.default
        props[p.name] = prop
    params = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    desc = description if description is not None else doc_desc
    if not desc:
        raise ConfigError(f"tool {fn.__name__} needs a docstring (or description=...): the model reads it")
    return Tool(name or fn.__name__, desc, params, fn, timeout=timeout)


class Toolbox:
    """The tools enabled for one agent: the only functions a model's call can reach.

    `run(name, arguments)` is the single door from model text to code. A name not in the box (a tool that exists
    elsewhere but was not enabled, or one the model or an injected document made up) is an error observation.
    """

    def __init__(self, tools: Sequence[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for t in tools:
            if not isinstance(t, Tool):
                t = function_tool(t)
            if t.name in self.tools:
                raise ConfigError(f"two tools are named {t.name!r}")
            self.tools[t.name] = t

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def run(self, name: Any, arguments: Any, timeout: float | None = None) -> Observation:
        if not isinstance(name, str) or name not in self.tools:
            return Observation(f"error: there is no tool {name!r}; the tools are: {', '.join(self.tools) or 'none'}",
                               False)
        return self.tools[name].run(arguments, timeout=timeout)
