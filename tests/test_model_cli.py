"""`lmforge info | import | export | attention-map`, checked against transformers (parameter counts, logits,
attention weights)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmforge  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.cli.model import attention_weights  # noqa: E402
from lmforge.models.config import ModelConfig  # noqa: E402
from lmforge.formats.hf import config_to_hf  # noqa: E402
from lmforge.models.decoder import Transformer  # noqa: E402


def _hf_from_config(cfg: ModelConfig):
    d = config_to_hf(cfg)
    mt = d.pop("model_type")
    return transformers.AutoConfig.for_model(mt, **{k: v for k, v in d.items() if k != "torch_dtype"})


@pytest.mark.parametrize("preset", ["gpt2", "llama-3.2-1b", "qwen2.5-0.5b", "mistral-7b"])
def test_info_parameter_counts_match_transformers(preset, capsys):
    cfg = ModelConfig.from_name(preset)
    with torch.device("meta"):  # shapes only: no memory, no init
        theirs = transformers.AutoModelForCausalLM.from_config(_hf_from_config(cfg)).num_parameters()
        ours = Transformer(cfg).num_params()
    assert cfg.num_params() == ours == theirs
    assert main(["info", preset]) == 0
    out = capsys.readouterr().out
    assert f"{theirs:,}" in out
    from lmforge.utils import human_bytes

    for dtype, b in (("fp32", 4), ("bf16", 2), ("int8", 1), ("int4", 0.5)):
        line = next(ln for ln in out.splitlines() if ln.startswith(dtype))
        assert human_bytes(theirs * b) in line


def test_gpt2_is_124m(capsys):
    main(["info", "gpt2"])
    assert "124,439,808" in capsys.readouterr().out  # the figure every GPT-2 course quotes


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    m = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("cli") / "hf"
    m.save_pretrained(d)
    return d, m


def test_import_export_roundtrip(tiny_llama, tmp_path, capsys):
    d, ref = tiny_llama
    assert main(["info", str(d)]) == 0
    assert "kv 2, GQA" in capsys.readouterr().out
    assert main(["import", str(d), "--out", str(tmp_path / "lmf")]) == 0
    assert main(["export", str(tmp_path / "lmf"), "--format", "hf", "--out", str(tmp_path / "hf2"),
                 "--dtype", "bfloat16"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    assert back.dtype == torch.bfloat16
    ids = torch.randint(0, 80, (1, 16))
    ours = lmforge.load(tmp_path / "hf2", dtype="float32").model(ids)
    with torch.no_grad():
        want = copy.deepcopy(ref).to(torch.bfloat16).float()(ids).logits  # bf16-rounded weights, run in fp32
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    assert main(["info", str(tmp_path / "lmf")]) == 0


class _IdTokenizer:
    """Ids are characters' code points - 32: enough to label an attention map."""

    special_tokens: dict = {}
    bos_token_id = None
    add_bos_token = False

    def encode(self, text, **_):
        return [ord(c) - 32 for c in text]

    @property
    def vocab(self):
        return {i: chr(i + 32).encode() for i in range(100)}


def test_attention_map_matches_transformers(tiny_llama, tmp_path):
    d, ref = tiny_llama
    lm = lmforge.load(d)
    lm.tokenizer = _IdTokenizer()
    labels, w = attention_weights(lm, "hello there", layer=1, head=3)
    assert labels == list("hello there")
    with torch.no_grad():
        theirs = ref(torch.tensor([lm.tokenizer.encode("hello there")]), output_attentions=True).attentions
    torch.testing.assert_close(w, theirs[1][0, 3], atol=1e-6, rtol=0)
    assert torch.allclose(w.sum(-1), torch.ones(len(labels))) and w.triu(1).abs().max() == 0


def test_attention_map_png(tmp_path, capsys):
    from tests.conftest import data_file

    model = data_file("stories260K/stories260K.bin")
    out = tmp_path / "map.png"
    assert main(["attention-map", str(model), "--prompt", "Once upon a time", "--layer", "-1", "--head", "2",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["attention-map", str(model), "--prompt", "x", "--layer", "5", "--out", str(tmp_path / "b.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --layer 5 is out of range") and err.count("\n") == 1
    assert not (tmp_path / "b.png").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["info", "gpt-9"]) == 1
    assert main(["import", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(importlib.util.find_spec("lmforge.formats.gguf") is None, reason="lmforge.formats.gguf not written yet")
def test_export_gguf_and_load_it_back(tmp_path):
    """`export --format gguf` delegates to lmforge.formats.gguf; `lmforge.load(x.gguf)` reads it back (f32: exact)."""
    import gguf

    from tests.conftest import data_file

    src = data_file("stories260K/stories260K.bin")
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), "--format", "gguf", "--out", str(out), "--dtype", "f32"]) == 0
    assert gguf.GGUFReader(str(out)).tensors
    a, b = lmforge.load(src), lmforge.load(out)
    ids = torch.tensor([[1] + a.tokenizer.encode("Once upon a time")])
    torch.testing.assert_close(b.model(ids), a.model(ids), atol=1e-6, rtol=0)


def test_info_hub_id_fetches_config_only(tiny_llama, monkeypatch, tmp_path, capsys):
    import httpx
    import huggingface_hub

    d, _ = tiny_llama
    seen = {}

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        seen["patterns"] = allow_patterns
        return str(d)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.chdir(tmp_path)
    assert main(["info", "someone/tiny-llama"]) == 0
    assert seen["patterns"] == ["*.json"] and "someone/tiny-llama" in capsys.readouterr().out

    def offline(*a, **k):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["info", "someone/tiny-llama"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download 'someone/tiny-llama'") and err.count("\n") == 1
    assert main(["info", "gpt-2"]) == 1
    assert "did you mean 'gpt2'?" in capsys.readouterr().err
