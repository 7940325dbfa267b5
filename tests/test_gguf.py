"""GGUF export/import: exact f32 round trips, the metadata llama.cpp needs, and (marker `llamacpp`) llama.cpp
itself generating the same greedy tokens as lmforge from the exported file."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import lmforge
from lmforge.models.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.formats.gguf import export_gguf, load_gguf
from lmforge.lm import LM
from lmforge.models.decoder import Transformer
from lmforge.compress.quantize import quantize_model

PROMPT = "Once upon a time"
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from conftest import data_file

    return lmforge.load(data_file("stories260K/stories260K.bin"))


@pytest.fixture(scope="module")
def tiny_gpt2():
    """A GPT-2-family model (biases, LayerNorm, learned positions) with a byte-level BPE trained here."""
    from lmforge.training.data import builtin_corpus
    from lmforge.tokenizers.bpe import Tokenizer

    tok = Tokenizer.train([builtin_corpus()[:30000]], vocab_size=320, progress=False)
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt-tiny", vocab_size=tok.vocab_size + 3, n_layer=2, n_embd=64, n_head=4,
                                block_size=128, init_std=0.1)  # 3 padding ids beyond the tokenizer
    return LM(Transformer(cfg).eval(), tok, cfg, chat_template=TEMPLATE)


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids]))[0]


def _prompt(lm):
    return ([lm.tokenizer.bos_token_id] if lm.tokenizer.add_bos_token else []) + lm.tokenizer.encode(PROMPT)


@pytest.mark.parametrize("dtype,atol", [("f32", 0.0), ("f16", 0.05), ("q8_0", 0.5)])
def test_stories_round_trip(stories, tmp_path, dtype, atol):
    path = export_gguf(stories, tmp_path / f"s-{dtype}.gguf", dtype)
    back = lmforge.load(path)  # lmforge.load dispatches .gguf to load_gguf
    ids = _prompt(stories)
    ref, out = _logits(stories, ids), _logits(back, ids)
    if atol == 0.0:
        assert torch.equal(ref, out)
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=atol)
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert back.tokenizer.encode(PROMPT) == stories.tokenizer.encode(PROMPT)
    assert back.config.n_kv_head == 4 and back.config.tie_word_embeddings


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
def test_gpt2_round_trip(tiny_gpt2, tmp_path, dtype):
    path = export_gguf(tiny_gpt2, tmp_path / f"g-{dtype}.gguf", dtype)
    back = load_gguf(path)
    ids = tiny_gpt2.tokenizer.encode("The def statement is executed")
    ref, out = _logits(tiny_gpt2, ids), _logits(back, ids)
    if dtype == "f32":
        assert torch.equal(ref, out)
    else:
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < {"f16": 1e-3, "q8_0": 2e-2, "q4_0": 0.35}[dtype]
    if dtype in ("q8_0", "q4_0"):  # the imported weights are exactly llama.cpp's block (de)quantization
        import gguf

        qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
        w = tiny_gpt2.model.blocks[1].mlp.down_proj.weight.detach().numpy()
        expect = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        assert np.array_equal(back.model.blocks[1].mlp.down_proj.weight.detach().numpy(), expect)
    tok = back.tokenizer
    assert tok.encode("The def statement <|endoftext|>", allowed_special="all") == \
        tiny_gpt2.tokenizer.encode("The def statement <|endoftext|>", allowed_special="all")
    assert back.chat_template == TEMPLATE and back.config.tie_word_embeddings


def test_metadata_llama_cpp_needs(stories, tiny_gpt2, tmp_path):
    import gguf

    r = gguf.GGUFReader(str(export_gguf(stories, tmp_path / "s.gguf", "q8_0")))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama"
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"]) == (512, 64, 5)
    assert (f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) \
        == (172, 8, 4)
    assert f["llama.rope.dimension_count"] == 8 and f["llama.rope.freq_base"] == 10000.0
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.tokens"]) == 512
    assert f["tokenizer.ggml.tokens"][:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert f["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # unknown, control, control, byte
    assert len(f["tokenizer.ggml.scores"]) == 512
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is True
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 172: not 32-blocks
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied head: llama.cpp reuses token_embd

    r = gguf.GGUFReader(str(export_gguf(tiny_gpt2, tmp_path / "g.gguf", "f16")))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "gpt2" and f["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == tiny_gpt2.config.vocab_size
    assert f["tokenizer.ggml.tokens"][-1].startswith("[PAD") and f["tokenizer.ggml.token_type"][-1] == 5
    assert f["tokenizer.ggml.merges"][0].count(" ") == 1
    assert f["tokenizer.chat_template"] == TEMPLATE
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == (64, 192) and "position_embd.weight" in shapes


def test_quantized_lmforge_model_exports(tiny_gpt2, tmp_path):
    import copy

    lm = LM(quantize_model(copy.deepcopy(tiny_gpt2.model), "int8", progress=False), tiny_gpt2.tokenizer,
            tiny_gpt2.config)
    back = load_gguf(export_gguf(lm, tmp_path / "q.gguf", "f32"))
    ids = tiny_gpt2.tokenizer.encode("The def statement")
    from lmforge.compress.quantize import QuantLinear
    QuantLinear.use_kernels = False  # the dequantized weights in fp32: what an f32 export carries
    try:
        exact = _logits(lm, ids)
    finally:
        QuantLinear.use_kernels = True
    torch.testing.assert_close(_logits(back, ids), exact, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(back, ids), _logits(lm, ids), rtol=0, atol=0.1)  # the kernels round x


def test_errors(tiny_gpt2, tmp_path):
    import gguf

    cfg = ModelConfig.from_name("llama-tiny", vocab_size=300, n_layer=1, sliding_window=16)
    with pytest.raises(ConfigError, match="llama and gpt2 architectures"):
        export_gguf(LM(Transformer(cfg), tiny_gpt2.tokenizer, cfg), tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="unknown GGUF dtype 'q5_k'"):
        export_gguf(tiny_gpt2, tmp_path / "x.gguf", "q5_k")
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="architecture 'mamba' is not supported"):
        load_gguf(tmp_path / "mamba.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        lmforge.load(tmp_path / "junk.gguf")
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------------------------
# llama.cpp itself (pip install llama-cpp-python; `make test-llamacpp`)
# ------------------------------------------------------------------------------------------------------------------
def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama_cpp (llama-cpp-python) is not installed; run `make test-llamacpp`")
    return llama_cpp


def llama_cpp_greedy(path, prompt_ids, n: int) -> list[int]:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        out = []
        for t in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(int(t))
            if len(out) == n:
                break
        return out
    finally:
        llm.close()


def llama_cpp_nll(path, ids) -> float:
    """Mean next-token negative log-likelihood of `ids` under llama.cpp's logits."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + 8, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()


def _ours_greedy(lm, prompt_ids, n):
    from lmforge.generation.loop import generate_ids
    from lmforge.generation.sampling import SamplingParams

    return generate_ids(lm.model, [prompt_ids], SamplingParams(temperature=0.0, max_new_tokens=n))[0].token_ids


@pytest.mark.llamacpp
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_greedy_equals_lmforge_stories(stories, tmp_path, dtype):
    path = export_gguf(stories, tmp_path / f"s-{dtype}.gguf", dtype)
    prompt = _prompt(stories)
    ours = _ours_greedy(stories, prompt, 60)
    assert llama_cpp_greedy(path, prompt, 60) == ours[:60]
    llm = _llama_cpp().Llama(model_path=str(path), n_ctx=64, verbose=False, n_threads=1)
    try:  # llama.cpp's SentencePiece tokenizer agrees with lmforge's llama2.c tokenizer on the embedded vocab
        assert llm.tokenize(PROMPT.encode(), add_bos=True) == prompt
    finally:
        llm.close()


@pytest.mark.llamacpp
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_greedy_equals_lmforge_gpt2(tiny_gpt2, tmp_path, dtype):
    path = export_gguf(tiny_gpt2, tmp_path / f"g-{dtype}.gguf", dtype)
    prompt = tiny_gpt2.tokenizer.encode("The def statement")
    assert llama_cpp_greedy(path, prompt, 40) == _ours_greedy(tiny_gpt2, prompt, 40)[:40]


@pytest.mark.llamacpp
def test_llama_cpp_q8_0_perplexity_delta(stories, tmp_path):
    text = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            "One day, she saw a big, red ball. She wanted to play with it, but it was too high.")
    ids = [1] + stories.tokenizer.encode(text)
    with torch.no_grad():
        ours = torch.nn.functional.cross_entropy(stories.model(torch.tensor([ids]))[0, :-1],
                                                 torch.tensor(ids[1:])).item()
    f32 = llama_cpp_nll(export_gguf(stories, tmp_path / "s-f32.gguf", "f32"), ids)
    q8 = llama_cpp_nll(export_gguf(stories, tmp_path / "s-q8.gguf", "q8_0"), ids)
    assert abs(f32 - ours) < 1e-3  # same model, same numbers
    assert abs(math.exp(q8) / math.exp(f32) - 1) < 0.01  # q8_0 within 1% perplexity
