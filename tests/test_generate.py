"""Generation end to end: greedy == transformers token for token, KV cache == no cache, batched == unbatched,
seeded sampling, stop strings / stop tokens / streaming, logprobs == scoring == transformers' log-probs,
bad input as one-line errors, and the stories260K check text from llama2.c."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.models.config import ModelConfig
from lmforge.errors import GenerationError
from lmforge.generation.api import encode_prompt
from lmforge.generation.loop import generate_ids, token_logprobs
from lmforge.generation.sampling import SamplingParams
from lmforge.generation.stops import StopChecker
from lmforge.generation.config import GenerationConfig
from lmforge.lm import LM
from lmforge.models.decoder import Transformer
from lmforge.tokenizers.bpe import Tokenizer

transformers = pytest.importorskip("transformers")


# ---- fixtures ------------------------------------------------------------------------------------------------------
def byte_tokenizer(**kw) -> Tokenizer:
    """One token per byte (so every multi-byte character spans tokens) plus <|endoftext|> = 256 as EOS."""
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens={"<|endoftext|>": 256},
                     eos_token="<|endoftext|>", **kw)


def tiny_lm(kind: str = "gpt", vocab_size: int = 257, tok=None, seed: int = 0, block_size: int = 64) -> LM:
    torch.manual_seed(seed)
    if kind == "gpt":
        cfg = ModelConfig.from_name("gpt-tiny", vocab_size=vocab_size, block_size=block_size, n_layer=2, n_embd=64,
                                    init_std=0.2)
    else:  # Llama-style with grouped-query attention
        cfg = ModelConfig.from_name("llama-tiny", vocab_size=vocab_size, block_size=block_size, n_layer=2, n_embd=64,
                                    n_head=4, n_kv_head=2, intermediate_size=96, init_std=0.2)
    return LM(Transformer(cfg).eval(), tok if tok is not None else byte_tokenizer(), cfg)


@pytest.fixture(scope="module")
def gpt2_tok(request):
    from conftest import data_file

    return Tokenizer.from_gpt2_files(data_file("gpt2/encoder.json"), data_file("gpt2/vocab.bpe"))


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """Tiny random GPT-2 and Llama checkpoints written by transformers, loaded back with lmforge.load."""
    T = transformers
    root = tmp_path_factory.mktemp("hf")
    out = {}
    torch.manual_seed(0)
    models = {
        "gpt2": T.GPT2LMHeadModel(T.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                               bos_token_id=299, eos_token_id=299, initializer_range=0.2)),
        "llama": T.LlamaForCausalLM(T.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                                  initializer_range=0.2)),
    }
    for name, m in models.items():
        m.eval()
        m.save_pretrained(root / name)
        out[name] = (m, lmforge.load(root / name))
    return out


PROMPTS_IDS = [[5, 17, 42, 8, 99, 3], [250, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


# ---- greedy equals transformers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_equals_transformers_token_for_token(hf_checkpoints, name):
    hf_model, lm = hf_checkpoints[name]
    eos = hf_model.config.eos_token_id
    for ids in PROMPTS_IDS:
        want = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=24, pad_token_id=eos)[0, len(ids):].tolist()
        got = lm.generate(ids, temperature=0, max_new_tokens=24)
        if want and want[-1] == eos:  # transformers keeps the EOS; lmforge reports it as finish_reason
            assert got.finish_reason == "stop" and got.stop_reason == eos
            want = want[:-1]
        assert got.token_ids == want


def test_batched_greedy_equals_transformers_left_padded(hf_checkpoints):
    hf_model, lm = hf_checkpoints["llama"]
    T = max(map(len, PROMPTS_IDS))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS_IDS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS_IDS])
    want = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, eos_token_id=None,
                             pad_token_id=0)[:, T:].tolist()
    got = lm.generate(PROMPTS_IDS, temperature=0, max_new_tokens=16, ignore_eos=True)
    assert [g.token_ids for g in got] == want


def test_logprobs_and_score_equal_transformers_log_softmax(hf_checkpoints):
    hf_model, lm = hf_checkpoints["gpt2"]
    prompt = PROMPTS_IDS[0]
    out = lm.generate(prompt, temperature=0, max_new_tokens=10, logprobs=True, top_logprobs=3, ignore_eos=True)
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        ref = hf_model(full).logits.float().log_softmax(-1)[0]  # (L, V)
    n = len(prompt)
    want = [ref[n - 1 + j, t].item() for j, t in enumerate(out.token_ids)]
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(want), atol=1e-4, rtol=0)
    for j, top in enumerate(out.top_logprobs):
        assert list(top)[0] == out.token_ids[j]  # greedy: the chosen token is the most likely one
        assert list(top) == ref[n - 1 + j].topk(3).indices.tolist()
    s = lm.score(prompt, out.token_ids)
    torch.testing.assert_close(torch.tensor(s.token_logprobs), torch.tensor(want), atol=1e-4, rtol=0)
    assert s.is_greedy and abs(s.logprob - sum(want)) < 1e-3
    total, per_token = s
    assert total == s.logprob and per_token == s.token_logprobs


# ---- cache, batching, seeds --------------------------------------------------------------------------------------
CONTROLS = [
    dict(temperature=0),
    dict(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3),
    dict(temperature=0.8, top_k=20, top_p=0.9, seed=3),
    dict(temperature=1.2, min_p=0.05, repetition_penalty=1.1, frequency_penalty=0.4, seed=11),
]


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("controls", CONTROLS, ids=["greedy", "greedy-penalties", "top-k-top-p", "min-p-penalties"])
def test_kv_cache_equals_no_cache_and_batched_equals_unbatched(kind, controls):
    lm = tiny_lm(kind)
    prompts = ["Hello there", "A", "The quick brown fox jumps"]
    kw = dict(max_new_tokens=12, logprobs=True, ignore_eos=True, **controls)
    batched = lm.generate(prompts, **kw)
    batched_nocache = lm.generate(prompts, use_cache=False, **kw)
    for i, p in enumerate(prompts):
        alone = lm.generate(p, **kw)
        alone_nocache = lm.generate(p, use_cache=False, **kw)
        for other in (batched[i], batched_nocache[i], alone_nocache):
            assert other.token_ids == alone.token_ids
            assert str(other) == str(alone)
            torch.testing.assert_close(torch.tensor(other.logprobs), torch.tensor(alone.logprobs), atol=1e-4,
                                       rtol=0)
        assert len(alone.token_ids) == 12 and alone.finish_reason == "length"


def test_per_sequence_stopping_in_a_batch():
    lm = tiny_lm("llama")
    prompts = ["abc", "Hello world, again", "x"]
    free = lm.generate(prompts, temperature=0, max_new_tokens=12, ignore_eos=True)
    # stop each row on a different token it actually generates, at a different step
    stops = [free[0].token_ids[2], free[1].token_ids[7]]
    got = lm.generate(prompts, temperature=0, max_new_tokens=12, stop_token_ids=stops)
    for i, g in enumerate(got):
        hits = [k for k, t in enumerate(free[i].token_ids) if t in stops]
        cut = hits[0] if hits else None
        assert g.token_ids == free[i].token_ids[:cut]
        assert g.finish_reason == ("stop" if hits else "length")
        alone = lm.generate(prompts[i], temperature=0, max_new_tokens=12, stop_token_ids=stops)
        assert alone.token_ids == g.token_ids


def test_context_window_ends_generation_per_row():
    lm = tiny_lm("gpt", block_size=24)  # learned positions: nothing exists past position 23
    long, short = "x" * 20, "y"
    out = lm.generate([long, short], temperature=0, max_new_tokens=10, ignore_eos=True)
    assert len(out[0].token_ids) == 4 and out[0].finish_reason == "length"
    assert len(out[1].token_ids) == 10
    assert out[1].token_ids == lm.generate(short, temperature=0, max_new_tokens=10, ignore_eos=True).token_ids


def test_seeded_sampling_is_reproducible():
    lm = tiny_lm("gpt")
    a = lm.generate("Once", temperature=1.0, max_new_tokens=30, seed=42, ignore_eos=True)
    b = lm.generate("Once", temperature=1.0, max_new_tokens=30, seed=42, ignore_eos=True)
    c = lm.generate("Once", temperature=1.0, max_new_tokens=30, seed=43, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    torch.manual_seed(5)
    d = lm.generate("Once", temperature=1.0, max_new_tokens=30, ignore_eos=True)
    torch.manual_seed(5)
    e = lm.generate("Once", temperature=1.0, max_new_tokens=30, ignore_eos=True)
    assert d.token_ids == e.token_ids  # without a seed, torch.manual_seed governs


def test_defaults_come_from_generation_config_and_kwargs_override():
    lm = tiny_lm("gpt")
    greedy = lm.generate("Hi", temperature=0, max_new_tokens=7, ignore_eos=True)
    lm.generation_config = GenerationConfig(temperature=0.0, max_new_tokens=7)
    assert lm.generate("Hi", ignore_eos=True).token_ids == greedy.token_ids
    sampled = lm.generate("Hi", temperature=1.5, seed=0, max_new_tokens=3, ignore_eos=True)
    assert len(sampled.token_ids) == 3 and sampled.token_ids != greedy.token_ids[:3]


# ---- text: stop strings, stop tokens, streaming ------------------------------------------------------------------
def test_stop_string_across_token_boundaries_is_not_emitted(gpt2_tok):
    lm = tiny_lm("gpt", vocab_size=gpt2_tok.vocab_size, tok=gpt2_tok, block_size=128)
    free = lm.generate("The meaning of life is", temperature=0, max_new_tokens=24, ignore_eos=True)
    text = str(free)
    # a stop string made of the end of one token and the start of the next
    ids = free.token_ids
    first = gpt2_tok.decode(ids[:5])
    assert len(gpt2_tok.decode([ids[5]])) >= 1
    stop = gpt2_tok.decode([ids[4]])[-1:] + gpt2_tok.decode([ids[5]])[:1]
    assert len(stop) == 2 and not stop.isspace()
    where = text.find(stop)
    assert 0 <= where < len(first) + 1
    got = lm.generate("The meaning of life is", temperature=0, max_new_tokens=24, stop=[stop, "zzzz-never"])
    assert str(got) == text[:where] and got.finish_reason == "stop" and got.stop_reason == stop
    # streaming: deltas join to the same text, and no prefix ever shows a character of the stop string
    deltas = list(lm.stream("The meaning of life is", temperature=0, max_new_tokens=24, stop=stop))
    assert "".join(deltas) == str(got)
    shown = ""
    for d in deltas:
        shown += d
        assert text[:where].startswith(shown)
    assert "".join(lm.stream("The meaning of life is", temperature=0, max_new_tokens=24, ignore_eos=True)) == text


def test_stop_checker_holds_partial_stop_text_and_whole_characters():
    tok = byte_tokenizer()
    c = StopChecker(tok, stop=["<END>"], stop_token_ids=[256])
    deltas = [c.push(b) for b in "a é<EN".encode()]
    assert "".join(deltas) == "a é" and "\ufffd" not in "".join(deltas)
    assert deltas[2] == "" and deltas[3] == "é"  # the first byte of é waits for the second
    assert c.push(ord("D")) == "" and c.push(ord(">")) == ""
    assert c.finished and c.finish_reason == "stop" and c.text == "a é"
    # a partial stop that does not complete is released once it cannot match any more
    c = StopChecker(tok, stop=["<END>"])
    out = "".join(c.push(b) for b in b"x<ENy")
    assert out == "x<ENy" and not c.finished
    # at the end, held-back text is flushed; an unfinished character becomes U+FFFD
    c = StopChecker(tok, stop=["<END>"])
    out = "".join(c.push(b) for b in "ok<E".encode()) + c.flush()
    assert out == "ok<E" and c.finish_reason == "length"
    c = StopChecker(tok)
    out = "".join(c.push(b) for b in "日本".encode()[:-1]) + c.flush()
    assert out == "日\ufffd"
    # stop token: finished, not part of the text
    c = StopChecker(tok, stop_token_ids=[256])
    assert c.push(ord("a")) == "a" and c.push(256) == "" and c.finished and c.text == "a" and c.token_ids == [97]


def test_streaming_never_splits_multibyte_characters():
    lm = tiny_lm("llama", seed=1)
    deltas = list(lm.stream("日本語のテキスト", temperature=1.0, top_k=40, seed=0, max_new_tokens=60, ignore_eos=True))
    full = lm.generate("日本語のテキスト", temperature=1.0, top_k=40, seed=0, max_new_tokens=60, ignore_eos=True)
    assert "".join(deltas) == str(full)
    # every delta is what decoding the bytes so far gives, never a character cut in half and "repaired" later
    raw = bytes(full.token_ids)
    text = raw.decode("utf-8", errors="replace")
    assert "".join(deltas) == text


def test_eos_ends_generation_and_is_not_returned():
    lm = tiny_lm("gpt")
    free = lm.generate("Hey", temperature=0, max_new_tokens=15, ignore_eos=True)
    eos_like = free.token_ids[6]
    lm.generation_config = GenerationConfig(eos_token_id=eos_like)
    out = lm.generate("Hey", temperature=0, max_new_tokens=15)
    assert out.token_ids == free.token_ids[:free.token_ids.index(eos_like)] and out.finish_reason == "stop"


# ---- scoring ----------------------------------------------------------------------------------------------------
def test_score_batch_equals_single_and_direct_forward():
    from lmforge.generation.api import score_batch

    lm = tiny_lm("llama")
    pairs = [("The cat", " sat on the mat"), ("A", "b"), ("Long prompt " * 3 + "x", " end")]
    many = score_batch(lm, pairs, batch_size=2)
    for (p, c), s in zip(pairs, many):
        one = lm.score(p, c)
        assert one.token_ids == s.token_ids == list(c.encode())
        torch.testing.assert_close(torch.tensor(one.token_logprobs), torch.tensor(s.token_logprobs), atol=1e-5,
                                   rtol=0)
        ids = torch.tensor([list(p.encode()) + list(c.encode())])
        with torch.no_grad():
            lp = lm.model(ids).log_softmax(-1)[0]
        n = len(p.encode())
        want = [lp[n - 1 + j, t].item() for j, t in enumerate(c.encode())]
        torch.testing.assert_close(torch.tensor(s.token_logprobs), torch.tensor(want), atol=1e-5, rtol=0)
    # token_logprobs with top alternatives (the server's echo + logprobs)
    (lps, greedy_ok, top), = token_logprobs(lm.model, [[1, 2, 3, 4]], top_logprobs=2)
    assert len(lps) == len(greedy_ok) == len(top) == 3 and all(len(t) == 2 for t in top)


def test_empty_prompt_uses_bos_or_errors():
    lm = tiny_lm("gpt")
    s = lm.score("", "ab")  # no BOS: the EOS/document separator conditions the first token
    assert len(s.token_logprobs) == 2
    with pytest.raises(GenerationError, match="empty prompt"):
        lm.generate("", max_new_tokens=3)
    llama = tiny_lm("llama", tok=byte_tokenizer(bos_token="<|endoftext|>", add_bos_token=True))
    out = llama.generate("", max_new_tokens=3, ignore_eos=True)
    assert out.prompt_tokens == 1 and len(out.token_ids) == 3


# ---- chat -----------------------------------------------------------------------------------------------------------
class ScriptedModel(torch.nn.Module):
    """A stand-in model (batch 1, cached decoding) whose next token follows a script: for end-to-end text tests."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, block_size=256, n_layer=1, n_head=1, n_embd=4)
        self.script, self.step = script, 0
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.prompts = []

    def new_cache(self, B, max_len=None):
        return object()

    def forward(self, ids, attention_mask=None, kv_cache=None, logits_to_keep=0):
        if ids.shape[1] > 1 or self.step == 0:
            self.prompts.append(ids[0].tolist())
            self.step = 0
        logits = torch.full((1, 1, self.config.vocab_size), -10.0)
        logits[0, 0, self.script[min(self.step, len(self.script) - 1)]] = 10.0
        self.step += 1
        return logits


def test_chat_renders_template_and_stops_at_end_of_turn():
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens={"<|im_end|>": 256, "<|eos|>": 257},
                    eos_token="<|eos|>")
    script = list(b"Hi, I am fine.") + [256] + list(b"garbage")
    model = ScriptedModel(script, 258)
    lm = LM(model, tok, model.config)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How are you?"}]
    assert lm.chat(messages, temperature=0) == "Hi, I am fine."
    want_prompt = "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n" \
                  "<|im_start|>assistant\n"
    assert model.prompts[-1] == tok.encode(want_prompt, allowed_special="all")
    assert 256 in model.prompts[-1]  # <|im_end|> in the template became the special token
    from lmforge.generation.api import chat_stream

    model.step = 0
    assert "".join(chat_stream(lm, messages, temperature=0)) == "Hi, I am fine."
    # when the end-of-turn marker is plain text (no special token), it is a stop string
    lm2 = LM(ScriptedModel(list(b"Sure.<|im_end|>more"), 257), byte_tokenizer())
    assert lm2.chat([{"role": "user", "content": "x"}], temperature=0) == "Sure."
    with pytest.raises(GenerationError, match="unknown chat role 'wizard'"):
        lm.chat([{"role": "wizard", "content": "x"}])


# ---- bad input --------------------------------------------------------------------------------------------------
def test_bad_input_one_line_errors():
    lm = tiny_lm("gpt", block_size=32)
    with pytest.raises(GenerationError, match="prompt is 40 tokens but the context window is 32"):
        lm.generate("z" * 40)
    out = lm.generate("z" * 40, truncate=True, temperature=0, max_new_tokens=5, ignore_eos=True)
    assert out.prompt_tokens == 31 and len(out.token_ids) == 1  # the window holds 31 + 1
    for bad, word in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                      (dict(top_p=0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(tempreature=1), "temperature")]:
        with pytest.raises(GenerationError, match=word) as e:
            lm.generate("a", **bad)
        assert "\n" not in str(e.value)
    assert lm.generate("a", max_new_tokens=0) == ""
    with pytest.raises(GenerationError, match="one prompt"):
        lm.stream(["a", "b"])


def test_generate_ids_without_tokenizer():
    lm = tiny_lm("gpt")
    params = SamplingParams(temperature=0, max_new_tokens=5, stop_token_ids=[])
    out = generate_ids(lm.model, [[1, 2, 3]], params)
    assert len(out[0].token_ids) == 5 and str(out[0]) == ""


# ---- llama2.c check text ------------------------------------------------------------------------------------------
def test_stories260k_greedy_matches_llama2c_check_text():
    from conftest import data_file

    model_path, tok_path = data_file("stories260K/stories260K.bin"), data_file("stories260K/tok512.bin")
    pytest.importorskip("lmforge.formats.llama2c")
    lm = lmforge.load(model_path, tokenizer=tok_path)
    expected = (
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she "
        "saw a big, red ball. She wanted to play with it, but it was too high.\n"
        "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want "
        "to play with your ball, but I can't find it.\"\n"
        "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
        "Lily didn't want to help her mom, so she"
    )
    prompt = "Once upon a time"
    n_prompt = len(encode_prompt(lm, prompt))  # BOS included
    # llama2.c's -n 200 counts positions: BOS + prompt + generated = 201 tokens, 200 forward passes
    out = lm.generate(prompt, temperature=0, max_new_tokens=200 - (n_prompt - 1))
    assert prompt + str(out) == expected
    # scoring text with a SentencePiece-style tokenizer: the continuation is cut from the whole text's tokens, so
    # no spurious leading-space token appears, and the greedy continuation is recognised as greedy
    s = lm.score(prompt, ", there was a little girl")
    assert s.is_greedy and s.token_ids == out.token_ids[:len(s.token_ids)]
    assert lm.score(prompt + " ", "there").token_ids == lm.score(prompt, " there").token_ids


def test_stream_does_not_leak_inference_mode_or_eval_mode():
    lm = tiny_lm("gpt")
    lm.model.train()
    it = lm.stream("Hi", max_new_tokens=5, temperature=0, ignore_eos=True)
    next(it)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    list(it)
    assert lm.model.training  # restored once the stream is done


def test_typed_params_equal_keyword_controls_and_are_checked_at_the_door():
    """One typed SamplingParams from the caller (the CLI and server build one) gives what the keywords give;
    keywords override its fields; an unknown control or a run option passed as a control is a one-line error."""
    from lmforge.generation.api import chat_params, resolve_params

    lm = tiny_lm("llama")
    lm.generation_config = GenerationConfig(temperature=0.0, max_new_tokens=7, stop_token_ids=[3])
    params = resolve_params(lm, {"temperature": 0.8, "top_p": 0.9, "seed": 5, "ignore_eos": True})
    assert isinstance(params, SamplingParams) and params.max_new_tokens == 7  # the model's default kept
    assert params.stop_token_ids[0] == 3 and params.temperature == 0.8
    keyword = lm.generate("abc", temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    typed = lm.generate("abc", params)
    assert typed.token_ids == keyword.token_ids and len(typed.token_ids) == 7
    greedy = lm.generate("abc", params, temperature=0.0)  # a keyword overrides the typed field
    assert greedy.token_ids == lm.generate("abc", temperature=0.0, ignore_eos=True).token_ids
    with pytest.raises(GenerationError, match="unknown generation control 'temprature'.*'temperature'"):
        resolve_params(lm, {"temprature": 1.0})
    with pytest.raises(GenerationError, match="'truncate' .*run option"):
        resolve_params(lm, {"truncate": True})
    with pytest.raises(GenerationError, match="top_p"):
        lm.generate("abc", params, top_p=1.5)
    lm.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}<|im_start|>"
    assert "<|im_end|>" in chat_params(lm, params).stop
