"""JSON-constrained generation from the Python API and the CLI (`json=True`, `json_schema=...`, `--json`,
`--json-schema`), on tiny random models: every complete output parses and validates against the schema with the
`jsonschema` package (the reference validator), greedy and sampled, one prompt or a batch, streamed or not; a
constraint that allows every token leaves decoding exactly as it was (greedy and sampled); bad input is one line."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import GenerationError
from lmforge.generation.config import GenerationConfig
from lmforge.generation.constrain import JsonMachine, pick_allowed
from lmforge.generation.loop import generate_ids
from lmforge.generation.sampling import SamplingParams, process_logits
from lmforge.lm import LM
from lmforge.models.config import ModelConfig
from lmforge.models.decoder import Transformer
from lmforge.tokenizers.bpe import Tokenizer

jsonschema = pytest.importorskip("jsonschema")

# Every part bounded (short strings, enums, booleans, numbers of at most 24 characters), so any path through the
# schema is complete within about 150 byte tokens: a random model must finish, and the test can demand it.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "unit": {"enum": ["c", "f"]},
        "tag": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 3}]},
    },
    "required": ["name", "age", "score", "member", "unit", "tag"],
    "additionalProperties": False,
}


def byte_tokenizer() -> Tokenizer:
    """One token per byte, so strings can be cut inside a multi-byte character; <|endoftext|> = 256 is EOS."""
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens={"<|endoftext|>": 256},
                     eos_token="<|endoftext|>")


def tiny_lm(kind: str, seed: int = 0) -> LM:
    torch.manual_seed(seed)
    if kind == "gpt":
        cfg = ModelConfig.from_name("gpt-tiny", vocab_size=257, block_size=256, n_layer=2, n_embd=64, init_std=0.2)
    else:
        cfg = ModelConfig.from_name("llama-tiny", vocab_size=257, block_size=256, n_layer=2, n_embd=64, n_head=4,
                                    n_kv_head=2, intermediate_size=96, init_std=0.2)
    return LM(Transformer(cfg).eval(), byte_tokenizer(), cfg, GenerationConfig(max_new_tokens=200))


@pytest.fixture(scope="module")
def lms():
    return {"gpt": tiny_lm("gpt"), "llama": tiny_lm("llama")}


def check_document(text: str, schema: dict | None) -> object:
    """The text parses as JSON, holds no replacement character (no half characters), and follows the schema."""
    doc = json.loads(text)
    assert "\ufffd" not in text
    if schema is None:
        assert isinstance(doc, dict)
    else:
        jsonschema.validate(doc, schema)
    return doc


SAMPLING = [dict(temperature=0.0), dict(temperature=1.0, seed=1), dict(temperature=0.7, top_p=0.9, seed=2),
            dict(temperature=1.3, top_k=20, repetition_penalty=1.3, seed=3)]


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("controls", SAMPLING, ids=["greedy", "t1", "top_p", "top_k_rep"])
def test_schema_output_parses_and_validates(lms, kind, controls):
    out = lms[kind].generate("A user record:", json_schema=SCHEMA, **controls)
    assert out.finish_reason == "stop", out
    check_document(out, SCHEMA)


def test_batch_and_stream_follow_the_schema_and_match_generate(lms):
    lm = lms["gpt"]
    prompts = ["A user:", "Another one, longer:"]
    outs = lm.generate(prompts, json_schema=SCHEMA, temperature=1.0, seed=5)
    for p, out in zip(prompts, outs):
        check_document(out, SCHEMA)
        assert out == lm.generate(p, json_schema=SCHEMA, temperature=1.0, seed=5)  # batched == alone
    assert "".join(lm.stream(prompts[1], json_schema=SCHEMA, temperature=1.0, seed=5)) == outs[1]


@pytest.mark.parametrize("controls", SAMPLING[:3], ids=["greedy", "t1", "top_p"])
def test_json_mode_gives_an_object_or_a_valid_prefix(lms, controls):
    """json=True allows any object, which a random model need not ever close: a complete answer parses as an
    object; one cut by max_new_tokens is still a prefix of a JSON document."""
    complete = 0
    for kind, lm in lms.items():
        for prompt in ("JSON:", "{", "Reply:"):
            out = lm.generate(prompt, json=True, max_new_tokens=60, **controls)
            if out.finish_reason == "stop":
                check_document(out, None)
                complete += 1
            else:
                m = JsonMachine()
                assert all(m.feed(b) for b in out.encode()) and not m.complete, out
    print(f"{complete} of 6 answers complete")


class AllowAll:
    """A constraint that refuses nothing and never completes."""

    def allows(self, token_id):
        return True

    def advance(self, token_id):
        pass

    def is_complete(self):
        return False


@pytest.mark.parametrize("controls", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.8, seed=7)],
                         ids=["greedy", "sampled"])
def test_a_constraint_that_allows_everything_changes_nothing(lms, controls):
    """The constrained sampler draws each row with the row's own generator, as the plain sampler does: where the
    model's choice is allowed, the token is the same."""
    lm = lms["llama"]
    prompts = [[5, 17, 42, 8], [250, 7]]
    params = SamplingParams(max_new_tokens=30, stop_token_ids=[256], **controls)
    plain = generate_ids(lm.model, prompts, params, lm.tokenizer)
    allowed = generate_ids(lm.model, prompts, params, lm.tokenizer, constraints=[AllowAll(), AllowAll()])
    assert [c.token_ids for c in plain] == [c.token_ids for c in allowed]
    static = generate_ids(lm.model, prompts, params, lm.tokenizer, constraints=[AllowAll(), AllowAll()],
                          static=True)  # the static-shape decode step (what torch.compile runs)
    assert [c.token_ids for c in plain] == [c.token_ids for c in static]


class AllowSet(AllowAll):
    def __init__(self, ids):
        self.ids = set(ids)

    def allows(self, token_id):
        return token_id in self.ids


@pytest.mark.parametrize("controls", [dict(temperature=1.0), dict(temperature=0.7, top_k=6)], ids=["t1", "top_k"])
def test_refused_draws_sample_the_restricted_distribution(controls):
    """`pick_allowed` (first draw, redraws without replacement, then a draw among all allowed) gives each allowed
    token p(t) / p(allowed) under the controlled distribution (the model's own when the controls leave none):
    frequencies of 6,000 draws against that, within 4.5 standard errors."""
    torch.manual_seed(0)
    logits = torch.randn(40) * 2  # (V,)
    params = SamplingParams(**controls)
    scores = process_logits(logits[None], params)[0]
    allowed = [3, 7, 11, 19, 20, 33]
    pool = scores if torch.isfinite(scores[allowed]).any() else logits
    target = torch.full_like(pool, float("-inf"))
    target[allowed] = pool[allowed]
    expected = target.softmax(-1)
    g = torch.Generator().manual_seed(0)
    n = 6000
    counts = torch.zeros(40)
    for _ in range(n):
        counts[pick_allowed(scores, logits, AllowSet(allowed), params, g, tries=3)] += 1
    freq = counts / n
    se = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 4.5 * se + 1e-9).all(), (freq[allowed], expected[allowed])
    greedy_params = SamplingParams(temperature=0.0)
    assert pick_allowed(logits, logits, AllowSet(allowed), greedy_params, None) == max(allowed, key=logits.__getitem__)
    assert pick_allowed(logits, logits, AllowSet([]), params, g) is None


def test_gpt2_bpe_tokens_keep_the_schema(shared_data):
    """Real multi-byte BPE tokens (GPT-2's 50,257, which hold partial UTF-8 characters too) on a random model."""
    tok = Tokenizer.from_gpt2_files(shared_data("gpt2/encoder.json"), shared_data("gpt2/vocab.bpe"))
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt-tiny", vocab_size=50257, block_size=256, n_layer=1, n_embd=32, init_std=0.2)
    lm = LM(Transformer(cfg).eval(), tok, cfg, GenerationConfig(max_new_tokens=60))
    schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "member": {"type": "boolean"},
                                               "name": {"type": "string", "maxLength": 4}}}
    for controls in SAMPLING[:2]:
        out = lm.generate("A user record:", json_schema=schema, **controls)
        assert out.finish_reason == "stop", out
        check_document(out, schema)


def test_bad_requests_are_one_line_errors(lms):
    lm = lms["gpt"]
    with pytest.raises(GenerationError, match="json_schema must be a JSON schema object"):
        lm.generate("x", json_schema='{"type": "object"}')
    with pytest.raises(GenerationError, match="json must be True or False"):
        lm.generate("x", json="yes")
    with pytest.raises(GenerationError, match="not beam search"):
        lm.generate("x", json=True, num_beams=2)
    assert SamplingParams(json_schema={}).json  # a schema implies JSON mode
    gc = GenerationConfig.from_dict({"temperature": 0.5, "json": True})  # not a model default: kept as extra
    assert gc.json is False and gc.extra == {"json": True}
    assert "json_schema" not in GenerationConfig(json_schema={"type": "object"}).to_dict()  # never a model default


# ---- CLI -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, lms):
    d = tmp_path_factory.mktemp("m") / "model"
    lms["gpt"].save(d)
    return d


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags", [["-t", "0"], ["-t", "1.0", "--seed", "4"], ["-t", "0.8", "--seed", "1", "--stream"]],
                         ids=["greedy", "sampled", "stream"])
def test_cli_json_schema(model_dir, tmp_path, capsys, flags):
    schema = tmp_path / "user.schema.json"
    schema.write_text(json.dumps(SCHEMA))
    code, out, err = run(["generate", model_dir, "A user record:", "--json-schema", schema, "-n", "200", *flags],
                         capsys)
    assert code == 0, err
    check_document(out.rstrip("\n"), SCHEMA)


def test_cli_json_mode_and_errors(model_dir, tmp_path, capsys, monkeypatch):
    code, out, err = run(["generate", model_dir, "{", "--json", "-t", "0", "-n", "60"], capsys)
    assert code == 0, err
    text = out.rstrip("\n")
    m = JsonMachine()
    assert all(m.feed(b) for b in text.encode())  # a JSON object, or a prefix of one when cut at 60 tokens
    if m.complete:
        check_document(text, None)
    for content, msg in [(None, "JSON schema file not found"), ("{not json", "not a JSON file"),
                         ("[1, 2]", "must be a JSON object")]:
        path = tmp_path / "bad.json"
        if content is not None:
            path.write_text(content)
        code, out, err = run(["generate", model_dir, "x", "--json-schema", tmp_path / ("bad.json" if content else
                                                                                       "missing.json")], capsys)
        assert code == 1 and err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1, err
