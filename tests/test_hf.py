"""Hugging Face interop against the live oracle: tiny random checkpoints written by `transformers` itself.

Every check compares lmforge's logits with transformers' logits on the same ids (fp32, within 1e-5), for
loading an HF directory, for the lmforge directory round trip, and for lmforge -> HF export -> transformers.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmforge  # noqa: E402
from lmforge.formats.hf import export_hf  # noqa: E402
from lmforge.errors import CheckpointError, LmforgeError, NetworkError  # noqa: E402
from lmforge.formats.hf import config_from_hf, from_hf_model  # noqa: E402
from helpers import to_hf_model  # noqa: E402

V = 96
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _make(kind: str):
    T = transformers
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
    if kind == "gpt2-untied":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))
    if kind == "llama-gqa-llama3rope":
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=50000.0,
                                                rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=256))
    if kind == "llama-mqa-tied":
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=True))
    if kind == "qwen2-tied":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    if kind == "qwen2-untied":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False))
    if kind == "mistral-window":
        return T.MistralForCausalLM(T.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=6))
    raise ValueError(kind)


KINDS = ["gpt2", "gpt2-untied", "llama-gqa-llama3rope", "llama-mqa-tied", "qwen2-tied", "qwen2-untied",
         "mistral-window"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """kind -> (directory written by save_pretrained, the transformers model)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in KINDS:
        m = _make(kind).eval()
        with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so they matter
            for name, p in m.named_parameters():
                if "norm" in name or "ln_" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        m.save_pretrained(root / kind)
        out[kind] = (root / kind, m)
    return out


def _ids(T=24, B=2):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("kind", KINDS)
def test_load_hf_dir_matches_transformers(hf_dirs, kind, tmp_path):
    d, ref = hf_dirs[kind]
    ids = _ids()
    want = _logits(ref, ids)
    lm = lmforge.load(d)
    assert lm.dtype == torch.float32
    torch.testing.assert_close(_logits(lm.model, ids), want, atol=1e-5, rtol=0)
    # lmforge directory round trip
    lm.save(tmp_path / "lmf")
    assert json.loads((tmp_path / "lmf" / "config.json").read_text())["format"] == "lmforge"
    lm2 = lmforge.load(tmp_path / "lmf")
    torch.testing.assert_close(_logits(lm2.model, ids), want, atol=1e-5, rtol=0)
    # lmforge -> HF export -> transformers, no custom code
    export_hf(lm2, tmp_path / "exported")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(back).__name__ == type(ref).__name__
    torch.testing.assert_close(_logits(back, ids), want, atol=1e-5, rtol=0)


def test_sliding_window_is_exercised(hf_dirs):
    """With T > window the Mistral logits depend on the window: equal logits above are not a coincidence."""
    d, ref = hf_dirs["mistral-window"]
    lm = lmforge.load(d)
    assert lm.config.sliding_window == 6
    lm.model.config.sliding_window = None
    ids = _ids()
    assert (_logits(lm.model, ids) - _logits(ref, ids)).abs().max() > 1e-4


def test_in_memory_converters(hf_dirs):
    ids = _ids()
    for kind in ("gpt2", "llama-gqa-llama3rope", "qwen2-tied"):
        _, ref = hf_dirs[kind]
        ours = from_hf_model(ref)
        torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=0)
        theirs = to_hf_model(ours)
        torch.testing.assert_close(_logits(theirs, ids), _logits(ref, ids), atol=1e-5, rtol=0)


def _rewrite_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_transformers4_and_5_config_keys(hf_dirs, tmp_path):
    """Hub checkpoints carry rope_theta/rope_scaling/torch_dtype (transformers 4); transformers 5 writes
    rope_parameters/dtype. Both must give the same model."""
    src, ref = hf_dirs["llama-gqa-llama3rope"]
    v5 = json.loads((src / "config.json").read_text())
    assert "rope_parameters" in v5 and "dtype" in v5  # what this transformers writes
    d4 = tmp_path / "v4"
    shutil.copytree(src, d4)

    def to_v4(cfg):
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params
        cfg["torch_dtype"] = cfg.pop("dtype")
        cfg["transformers_version"] = "4.45.0"

    _rewrite_config(d4, to_v4)
    ids = _ids(T=40)
    want = _logits(ref, ids)
    lm4, lm5 = lmforge.load(d4), lmforge.load(src)
    assert lm4.config.rope_theta == lm5.config.rope_theta == 50000.0
    assert lm4.config.rope_scaling["rope_type"] == lm5.config.rope_scaling["rope_type"] == "llama3"
    torch.testing.assert_close(_logits(lm4.model, ids), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(lm5.model, ids), want, atol=1e-5, rtol=0)
    # the scaling really matters for these ids (wavelengths beyond 16 positions are rescaled)
    unscaled = config_from_hf({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}})
    assert unscaled.rope_scaling is None

    # dtype "auto" follows torch_dtype (transformers 4) and dtype (transformers 5)
    _rewrite_config(d4, lambda c: c.update(torch_dtype="bfloat16"))
    assert lmforge.load(d4).dtype == torch.bfloat16
    assert lmforge.load(d4, dtype="float32").dtype == torch.float32
    d5 = tmp_path / "v5"
    shutil.copytree(src, d5)
    _rewrite_config(d5, lambda c: c.update(dtype="float16"))
    assert lmforge.load(d5).dtype == torch.float16


def test_sharded_and_pickle_checkpoints(hf_dirs, tmp_path):
    d, ref = hf_dirs["qwen2-untied"]
    ids = _ids()
    want = _logits(ref, ids)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(_logits(lmforge.load(tmp_path / "sharded").model, ids), want, atol=1e-5, rtol=0)

    pk = tmp_path / "pickle"
    pk.mkdir()
    shutil.copy(d / "config.json", pk / "config.json")
    torch.save(ref.state_dict(), pk / "pytorch_model.bin")
    torch.testing.assert_close(_logits(lmforge.load(pk).model, ids), want, atol=1e-5, rtol=0)

    # sharded pickles + pytorch_model.bin.index.json (older Hub checkpoints)
    sp = tmp_path / "sharded-pickle"
    sp.mkdir()
    shutil.copy(d / "config.json", sp / "config.json")
    names = list(ref.state_dict())
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        fname = f"pytorch_model-0000{k}-of-00002.bin"
        torch.save({n: ref.state_dict()[n] for n in part}, sp / fname)
        weight_map.update({n: fname for n in part})
    (sp / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.testing.assert_close(_logits(lmforge.load(sp).model, ids), want, atol=1e-5, rtol=0)
    (sp / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        lmforge.load(sp)


def test_lmforge_sharded_save(hf_dirs, tmp_path):
    d, ref = hf_dirs["llama-mqa-tied"]
    lm = lmforge.load(d)
    lm.save(tmp_path / "m")
    from lmforge.formats.native import save

    save(lm, tmp_path / "m", max_shard_bytes=8_000)  # re-save over it, sharded: stale files must go
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    ids = _ids()
    torch.testing.assert_close(_logits(lmforge.load(tmp_path / "m").model, ids), _logits(ref, ids),
                               atol=1e-5, rtol=0)


# ---- bad input ---------------------------------------------------------------------------------------------------
def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_unknown_architecture(hf_dirs, tmp_path):
    d = tmp_path / "bert"
    shutil.copytree(hf_dirs["llama-mqa-tied"][0], d)
    _rewrite_config(d, lambda c: c.update(model_type="bert", architectures=["BertForMaskedLM"]))
    with pytest.raises(CheckpointError) as e:
        lmforge.load(d)
    assert "bert" in _one_line_error(e) and "config.json" in str(e.value)


def test_config_does_not_match_weights(hf_dirs, tmp_path):
    d = tmp_path / "kv"
    shutil.copytree(hf_dirs["llama-gqa-llama3rope"][0], d)
    _rewrite_config(d, lambda c: c.update(num_key_value_heads=4))
    with pytest.raises(CheckpointError) as e:
        lmforge.load(d)
    msg = _one_line_error(e)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "(16, 32)" in msg and "(32, 32)" in msg

    d2 = tmp_path / "layers"
    shutil.copytree(hf_dirs["gpt2"][0], d2)
    _rewrite_config(d2, lambda c: c.update(n_layer=1))
    with pytest.raises(CheckpointError) as e:
        lmforge.load(d2)
    assert "transformer.h.1." in _one_line_error(e)

    d3 = tmp_path / "missing"
    shutil.copytree(hf_dirs["gpt2"][0], d3)
    _rewrite_config(d3, lambda c: c.update(n_layer=3))
    with pytest.raises(CheckpointError) as e:
        lmforge.load(d3)
    assert "transformer.h.2." in _one_line_error(e) and "missing" in str(e.value)


def test_truncated_safetensors_and_no_weights(hf_dirs, tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(hf_dirs["gpt2"][0], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        lmforge.load(d)
    assert "model.safetensors" in _one_line_error(e)

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(hf_dirs["gpt2"][0] / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError) as e:
        lmforge.load(empty)
    assert "no weights" in _one_line_error(e)

    with pytest.raises(CheckpointError) as e:
        lmforge.load(tmp_path / "nope" / "model")
    assert "no such file" in _one_line_error(e)


def test_hub_id_without_network(monkeypatch, tmp_path):
    import httpx
    import huggingface_hub

    def offline(*a, **k):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NetworkError) as e:
        lmforge.load("openai-community/gpt2")
    assert "openai-community/gpt2" in _one_line_error(e)


def test_hub_id_download_is_used(hf_dirs, monkeypatch, tmp_path):
    """A Hub id goes through snapshot_download and then loads like the directory it returns."""
    import huggingface_hub

    d, ref = hf_dirs["gpt2"]
    calls = {}

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        calls["repo"], calls["patterns"] = repo_id, allow_patterns
        return str(d)

    from types import SimpleNamespace

    files = ["config.json", "model.safetensors", "pytorch_model.bin"]
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=f) for f in files]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.chdir(tmp_path)
    lm = lmforge.load("someone/tiny-gpt2")
    assert calls["repo"] == "someone/tiny-gpt2" and "*.safetensors" in calls["patterns"]
    assert not any("bin" in p for p in calls["patterns"])
    ids = _ids()
    torch.testing.assert_close(_logits(lm.model, ids), _logits(ref, ids), atol=1e-5, rtol=0)


def test_failed_save_leaves_nothing(hf_dirs, tmp_path):
    lm = lmforge.load(hf_dirs["gpt2"][0])
    lm.save(tmp_path / "good")
    before = {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()}

    class Broken:
        def save(self, path):
            raise OSError("disk full")

    lm.tokenizer = Broken()
    with pytest.raises(OSError):
        lm.save(tmp_path / "good")
    with pytest.raises(OSError):
        lm.save(tmp_path / "new")
    assert {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]  # no temp dirs, no half-written "new"

    lm.tokenizer = None
    lm.model.config.o_bias = False  # not a GPT-2 any more: export refuses before writing anything
    lm.config = lm.model.config
    with pytest.raises(LmforgeError):
        export_hf(lm, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_original_gpt2_layout(hf_dirs, tmp_path):
    """openai-community/gpt2's own files: no `transformer.` prefix, and causal-mask buffers `h.N.attn.bias` saved
    as tensors. Both are handled (the buffers are recomputed, not loaded)."""
    from safetensors.torch import load_file, save_file

    d, ref = hf_dirs["gpt2"]
    old = tmp_path / "old-gpt2"
    shutil.copytree(d, old)
    sd = load_file(str(d / "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in sd.items()}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(legacy, str(old / "model.safetensors"))
    ids = _ids()
    torch.testing.assert_close(_logits(lmforge.load(old).model, ids), _logits(ref, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama-mqa-tied", "gpt2-untied"])
def test_quantized_model_dir_roundtrip(hf_dirs, kind, tmp_path):
    """quantization.json hook: save writes the model's quantization_config, load calls prepare_for_load first."""
    quantize = pytest.importorskip("lmforge.compress.quantize")
    lm = lmforge.load(hf_dirs[kind][0])
    quantize.quantize_model(lm.model, "int4", group_size=16, progress=False)
    ids = _ids()
    want = _logits(lm.model, ids)
    lm.save(tmp_path / "q")
    written = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert set(written.pop("checksums")) >= {"blocks.0.attn.q_proj.qweight"}
    assert written == lm.model.quantization_config
    back = lmforge.load(tmp_path / "q")
    assert back.model.quantization_config == lm.model.quantization_config
    torch.testing.assert_close(_logits(back.model, ids), want, atol=0, rtol=0)
    with pytest.raises(CheckpointError):
        export_hf(back, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_from_hf_model_copies(hf_dirs):
    _, ref = hf_dirs["gpt2"]
    ours = from_hf_model(ref)
    before = ref.transformer.h[0].attn.c_attn.weight.clone()
    with torch.no_grad():
        ours.blocks[0].attn.q_proj.weight.add_(1.0)
    assert torch.equal(ref.transformer.h[0].attn.c_attn.weight, before)


def test_hub_id_real_download_code_without_network(tmp_path):
    """The real huggingface_hub code path, pointed at a closed local port: one line, exit 1, nothing written."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    code = ("import sys, lmforge\n"
            "try:\n    lmforge.load('someone/some-model')\n"
            "except lmforge.LmforgeError as e:\n    print(type(e).__name__, e); sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith("NetworkError cannot download 'someone/some-model'") and r.stdout.count("\n") == 1


def test_save_unwraps_compiled_model(hf_dirs, tmp_path):
    lm = lmforge.load(hf_dirs["llama-mqa-tied"][0])
    ids = _ids()
    want = _logits(lm.model, ids)
    lm.model = torch.compile(lm.model)  # state_dict names get an `_orig_mod.` prefix; the directory must not
    lm.save(tmp_path / "m")
    torch.testing.assert_close(_logits(lmforge.load(tmp_path / "m").model, ids), want, atol=0, rtol=0)


def test_pickle_with_code_is_refused(hf_dirs, tmp_path):
    """pytorch_model.bin is read with weights_only=True: a pickle that references a callable never runs."""
    import os

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(hf_dirs["gpt2"][0] / "config.json", d / "config.json")
    torch.save({"transformer.wte.weight": torch.zeros(2), "hook": os.system}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        lmforge.load(d)
    assert "refused" in _one_line_error(e) and "pytorch_model.bin" in str(e.value)
