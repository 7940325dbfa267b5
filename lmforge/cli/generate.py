"""`lmforge generate` and `lmforge chat`: run a model from the terminal.

    lmforge generate runs/demo "The def statement" --max-new-tokens 40 --temperature 0.8 --top-p 0.95
    lmforge generate stories260K.bin --tokenizer tok512.bin --prompt "Once upon a time" --temperature 0 --stream
    lmforge generate runs/demo "A user record:" --json-schema user.schema.json  # output parses and follows it
    lmforge fewshot stories260K.bin --data SMSSpamCollection --shots 0,1,4 --method score   # in-context learning
    echo "Hello" | lmforge generate runs/demo --seed 0             # the prompt from stdin
    lmforge chat runs/chat-model --system "You are terse."          # /reset clears history, /exit quits

`generate` prints only the completion (the prompt is not echoed). Every control defaults to the model
directory's generation_config.json; flags override it. `chat` keeps the conversation history, renders it with the
model's chat template (ChatML when it has none), streams the reply, and reads one message per line when stdin is
not a terminal (so it can be scripted: `printf 'Hi\\n/exit\\n' | lmforge chat MODEL`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge import argconf
from lmforge.errors import ConfigError, GenerationError
from lmforge.recipes.fewshot import FewShotConfig, run_fewshot


def register(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser("generate", help="complete a prompt with a model",
                              description="Complete a prompt; prints only the completion.")
    _model_args(g)
    g.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="the prompt text (or --prompt; default: stdin)")
    g.add_argument("--prompt", "-p", help="the prompt text (default: read stdin)")
    g.add_argument("--stream", action="store_true", help="print the completion as it is generated")
    g.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (one-time compile cost, then faster steps)")
    g.add_argument("--json", action="store_true", default=None,
                   help="constrain the output to one JSON object (it ends when the object is complete)")
    g.add_argument("--json-schema", metavar="FILE",
                   help="constrain the output to JSON following this JSON schema file (implies --json)")
    _control_args(g)
    g.set_defaults(func=cmd_generate)

    f = subparsers.add_parser("fewshot", help="zero/one/few-shot classification of a labelled data set (no training)",
                              description="In-context learning: k demonstrations in the prompt, then each test "
                                          "example; accuracy, balanced accuracy and a confusion matrix per k.")
    f.add_argument("model", metavar="MODEL", help="model directory, HF dir or Hub id, .gguf or llama2.c .bin")
    f.add_argument("--config", "-c", help="YAML file of config fields")
    argconf.add_arguments(f, FewShotConfig, skip=("model",))
    f.set_defaults(func=cmd_fewshot)

    c = subparsers.add_parser("chat", help="interactive chat with a model (history, streamed replies)",
                              description="Chat with a model in the terminal. /reset clears the history, /exit quits.")
    _model_args(c)
    c.add_argument("--system", help="a system message that starts every conversation")
    _control_args(c)
    c.set_defaults(func=cmd_chat)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, Hugging Face directory or Hub id, .gguf or llama2.c .bin")
    p.add_argument("--tokenizer", help="tokenizer file for a llama2.c .bin model (default: beside it)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu (default), auto, cuda, mps")


def _control_args(p: argparse.ArgumentParser) -> None:
    """Every control defaults to None: the model's generation_config.json decides unless a flag is given."""
    p.add_argument("--max-new-tokens", "-n", type=int, help="most tokens to generate")
    p.add_argument("--temperature", "-t", type=float, help="0 = greedy; <1 sharper, >1 flatter")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with mass >= p")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the top token's probability")
    p.add_argument("--repetition-penalty", type=float, help=">1 discourages tokens already in the text")
    p.add_argument("--frequency-penalty", type=float, help="OpenAI: subtract penalty x count in the output")
    p.add_argument("--presence-penalty", type=float, help="OpenAI: subtract penalty once if in the output")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable; not printed)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")


CONTROLS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
            "presence_penalty", "stop", "seed")


def _params(lm, args: argparse.Namespace, chat: bool = False):
    """The flags as one validated `SamplingParams` over the model's defaults (a bad value is a one-line error
    before anything runs); chat: also stop at the template's end of turn."""
    from lmforge.generation.api import chat_params, resolve_params

    controls = {k: getattr(args, k) for k in CONTROLS if getattr(args, k, None) is not None}
    if "stop" in controls:
        controls["stop"] = [_unescape(s) for s in controls["stop"]]
    if getattr(args, "json", None):
        controls["json"] = True
    if getattr(args, "json_schema", None):
        controls["json_schema"] = read_schema(args.json_schema)
    return chat_params(lm, **controls) if chat else resolve_params(lm, controls)


def read_schema(path: str) -> dict:
    """A JSON schema file as a dict; a missing file, bad JSON or a non-object is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: JSON schema file not found")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON file ({getattr(e, 'msg', e)})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{path}: a JSON schema must be a JSON object, got a {type(schema).__name__}")
    return schema


def _unescape(text: str) -> str:
    r"""Let a shell user write a newline or tab stop as --stop '\n' or '\t'."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _load(args: argparse.Namespace):
    from lmforge.loader import load

    lm = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    if lm.tokenizer is None:
        raise GenerationError(f"{args.model}: the model has no tokenizer to turn text into ids")
    return lm


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.generation.api import generate, stream

    if args.prompt is not None and args.prompt_arg is not None:
        raise GenerationError("give the prompt once: as the argument after the model or as --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_arg
    if prompt is None:
        if sys.stdin.isatty():
            raise GenerationError("give a prompt (lmforge generate MODEL \"TEXT\" or --prompt TEXT) or pipe it on "
                                  "stdin")
        raw = getattr(sys.stdin, "buffer", None)  # (None when stdin is already text, as in tests)
        data = raw.read() if raw is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        try:  # as strict as a prompt file: a wrong encoding is named, not turned into U+FFFD
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GenerationError(f"the prompt on stdin is not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                                  f"{e.start}); convert it, e.g. with iconv -t UTF-8") from None
    lm = _load(args)
    params = _params(lm, args)
    if args.stream:
        for delta in stream(lm, prompt, params, truncate=args.truncate, compile=args.compile):
            sys.stdout.write(delta)
            sys.stdout.flush()
    else:
        sys.stdout.write(generate(lm, prompt, params, truncate=args.truncate, compile=args.compile))
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    run_fewshot(argconf.from_cli(FewShotConfig, args, args.config, model=args.model))
    return 0


def _fit_history(lm, messages: list[dict], room: int) -> list[dict]:
    """Drop the oldest exchanges (never the system message) until the rendered chat leaves `room` tokens free."""
    from lmforge.generation.api import encode_chat, chat_prompt

    block = lm.model.config.block_size
    while True:
        n = len(encode_chat(lm, chat_prompt(lm, messages)))
        if n + room <= block:
            return messages
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:  # only the newest message is left: let generation report the problem
            return messages
        messages = messages[:first] + messages[first + 1:]


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.generation.api import chat_stream

    lm = _load(args)
    params = _params(lm, args, chat=True)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    if interactive:
        print(f"chatting with {args.model} — /reset clears the history, /exit quits", file=sys.stderr)
    room = min(params.max_new_tokens or 64, 64)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break  # end of piped input
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(system)
            print("(history cleared)", file=sys.stderr if interactive else sys.stdout)
            continue
        if not line.strip():
            continue
        history = _fit_history(lm, history + [{"role": "user", "content": line}], room)
        reply = []
        for delta in chat_stream(lm, history, params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0
