"""ONNX export (`lmforge.formats.onnx`) run by onnxruntime, checked against lmforge's own PyTorch model.

Each family is exported once (tracing costs ~10 s on 2 busy cores): a GPT-2 model through the CLI (learned positions,
LayerNorm, GELU, tied head, with GPT-2's tokenizer) and a Mistral-like Llama model through the library (RoPE with
llama3 scaling, RMSNorm, SwiGLU, GQA, a sliding window shorter than the generation). Oracles: `Transformer.forward`
for logits (within 1e-4), and `lm.generate` (greedy) for the ids of the onnxruntime loop (equal).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import lmforge  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.errors import CheckpointError, ConfigError  # noqa: E402
from lmforge.formats.onnx import OnnxDecoder, export_onnx, input_names, output_names  # noqa: E402
from lmforge.lm import LM  # noqa: E402
from lmforge.models.config import ModelConfig  # noqa: E402
from lmforge.models.decoder import Transformer  # noqa: E402
from lmforge.tokenizers import Tokenizer  # noqa: E402

from helpers import shared_data_dir  # noqa: E402


def _sharpen(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights scaled up, so greedy choices are not near-ties that 1e-6 of float noise could flip."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    """A tiny GPT-2 with GPT-2's tokenizer saved as a model directory, exported by `lmforge export --format onnx`."""
    data = shared_data_dir() / "gpt2"
    if not (data / "vocab.bpe").exists():
        pytest.skip("GPT-2 tokenizer files not in ../shared/data/gpt2")
    tok = Tokenizer.from_gpt2_files(data / "encoder.json", data / "vocab.bpe")
    cfg = ModelConfig.from_name("gpt-tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4,
                                block_size=96)
    d = tmp_path_factory.mktemp("onnx-gpt2")
    LM(_sharpen(Transformer(cfg), 0), tok).save(d / "model")
    assert main(["export", str(d / "model"), "--format", "onnx", "--out", str(d / "onnx")]) == 0
    return lmforge.load(str(d / "model")), d / "onnx"


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                block_size=96, sliding_window=12,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    lm = LM(_sharpen(Transformer(cfg), 1), None)
    out = export_onnx(lm, tmp_path_factory.mktemp("onnx-llama") / "onnx")
    return lm, out


@pytest.fixture(params=["gpt2", "llama"])
def exported(request):
    return request.getfixturevalue(f"{request.param}_export")


def test_graph_has_the_cache_as_inputs_and_outputs(exported):
    import onnx

    lm, d = exported
    n = lm.config.n_layer
    graph = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == input_names(n)
    assert [o.name for o in graph.output] == output_names(n)
    past = next(i for i in graph.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    # (batch, n_kv_head, past, head_dim): batch and past are named (dynamic) axes, the others fixed
    assert past[0].dim_param and past[2].dim_param and past[0].dim_param != past[2].dim_param
    assert (past[1].dim_value, past[3].dim_value) == (lm.config.n_kv_head, lm.config.head_dim)


def test_prefill_and_cached_steps_match_the_pytorch_forward(exported):
    """A left-padded batch: prefill logits, then three one-token steps feeding `present` back, against the full
    forward over the whole sequence (the cache must give what recomputing everything gives)."""
    lm, d = exported
    dec = OnnxDecoder(d, threads=1)
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0  # row 1 is left-padded
    ids[1, :7] = 0
    with torch.no_grad():
        ref = lm.model(ids, attention_mask=mask).numpy()  # (2, 20, V)
    real = mask.bool().numpy()
    logits, past = dec.forward(ids[:, :17].numpy(), attention_mask=mask[:, :17].numpy())
    assert np.abs(logits - ref[:, :17])[real[:, :17]].max() < 1e-4
    for t in range(17, 20):  # decode steps: T = 1, the past grows by one each time
        logits, past = dec.forward(ids[:, t:t + 1].numpy(), past, attention_mask=mask[:, :t + 1].numpy())
        assert logits.shape == (2, 1, V)
        assert np.abs(logits[:, 0] - ref[:, t]).max() < 1e-4
    assert past[0].shape == (2, lm.config.n_kv_head, 20, lm.config.head_dim)


def test_greedy_generation_gives_lmforge_ids(exported):
    lm, d = exported
    dec = OnnxDecoder(d, threads=1)
    for prompt in ([5, 17, 33, 2, 99], [7]):  # a prompt, and a single token (prefill of length 1)
        ref = lm.generate(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True).token_ids
        assert dec.generate_ids(prompt, max_new_tokens=40, stop_token_ids=()) == ref
    # a prompt near the end of the context window: both stop at block_size
    long = list(range(10, 10 + lm.config.block_size - 5))
    ref = lm.generate(long, max_new_tokens=40, temperature=0.0, ignore_eos=True).token_ids
    assert dec.generate_ids(long, max_new_tokens=40, stop_token_ids=()) == ref and len(ref) == 5


def test_text_generation_with_the_exported_tokenizer(gpt2_export):
    lm, d = gpt2_export
    dec = OnnxDecoder(d)
    assert dec.tokenizer is not None and dec.eos_token_id == [lm.tokenizer.eos_token_id]
    prompt = "The def statement defines a function"
    assert dec.generate(prompt, max_new_tokens=25) == lm.generate(prompt, max_new_tokens=25, temperature=0.0)


def test_bad_inputs_are_one_line_errors(tmp_path, gpt2_export, capsys):
    lm, d = gpt2_export
    with pytest.raises(CheckpointError, match="no onnx_config.json"):
        OnnxDecoder(tmp_path)
    q = lmforge.quantize(lm, "int8")
    with pytest.raises(ConfigError, match="quantized|nn.Linear"):
        export_onnx(q, tmp_path / "q")
    assert main(["export", str(lm.path), "--format", "onnx", "--out", str(tmp_path / "x"), "--dtype", "bfloat16"]) != 0
    assert "float32 only" in capsys.readouterr().err
    assert main(["export", str(lm.path), "--format", "onnx", "--out", str(d)]) != 0  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
