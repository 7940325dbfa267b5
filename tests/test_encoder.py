"""The encoder against transformers: random tiny BERT / RoBERTa / DistilBERT models (and their task heads) load
through lmforge.formats.bert with every hidden state within 1e-5, and lmforge's export loads back in transformers
with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.encoder_lm import EncoderLM, load_encoder_dir  # noqa: E402
from lmforge.errors import CheckpointError, ConfigError, GenerationError, LmforgeError  # noqa: E402
from lmforge.formats.bert import (config_from_hf, export_encoder_hf, from_hf_name,  # noqa: E402
                                  to_hf_name, NAMES)
from lmforge.models.encoder import Encoder, EncoderConfig, position_ids_for  # noqa: E402
from lmforge.models.heads import (MLMHead, QuestionAnsweringHead, SequenceClassificationHead,  # noqa: E402
                                  TokenClassificationHead)

V = 99


def _hf_config(family: str, **kw):
    if family == "distilbert":
        return transformers.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                             max_position_embeddings=40, pad_token_id=0, **kw)
    cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
    extra = {"pad_token_id": 1, "type_vocab_size": 1} if family == "roberta" else {"type_vocab_size": 2}
    return cls(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=40, **extra, **kw)


_ARCH = {("bert", None): "BertModel", ("roberta", None): "RobertaModel", ("distilbert", None): "DistilBertModel"}


def _hf_model(family: str, kind: str | None = None, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = _hf_config(family, num_labels=2 if kind == "question_answering" else 3, **kw)
    prefix = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}[family]
    name = _ARCH.get((family, kind)) or prefix + {"mlm": "ForMaskedLM", "sequence_classification":
                                                  "ForSequenceClassification", "token_classification":
                                                  "ForTokenClassification", "question_answering":
                                                  "ForQuestionAnswering"}[kind]
    model = getattr(transformers, name)(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms, biases and pads (init leaves them at 1/0)
        for n, p in model.named_parameters():
            if "LayerNorm" in n or "layer_norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _batch(family: str, B=3, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    pad = 1 if family == "roberta" else 0
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # padded rows
    mask[2, 4:] = 0
    ids[mask == 0] = pad
    types = torch.zeros(B, T, dtype=torch.long)
    if family == "bert":
        types[:, 5:] = 1
        types[mask == 0] = 0
    return ids, mask, types


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (HF model, its save_pretrained directory)."""
    out = {}
    for family in ("bert", "roberta", "distilbert"):
        m = _hf_model(family)
        d = tmp_path_factory.mktemp(family)
        m.save_pretrained(d)
        out[family] = (m, d)
    return out


def _ours(lm: EncoderLM, family, ids, mask, types):
    kw = {"token_type_ids": types} if family == "bert" else {}
    return lm.model(ids, mask, output_hidden_states=True, **kw)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_hidden_states_match_transformers(saved, family):
    hf, d = saved[family]
    lm = load_encoder_dir(d)
    ids, mask, types = _batch(family)
    with torch.no_grad():
        kw = {"token_type_ids": types} if family == "bert" else {}
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
        last, hidden = _ours(lm, family, ids, mask, types)
    assert len(hidden) == len(ref.hidden_states) == 3
    real = mask.bool()
    for ours, theirs in zip(hidden, ref.hidden_states):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(last[real], ref.last_hidden_state[real], atol=1e-5, rtol=0)
    if family != "distilbert":
        torch.testing.assert_close(lm.model.pool(last), ref.pooler_output, atol=1e-5, rtol=0)
    else:
        with pytest.raises(ConfigError):
            lm.model.pool(last)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_export_loads_back_in_transformers(saved, family, tmp_path):
    hf, d = saved[family]
    lm = load_encoder_dir(d)
    export_encoder_hf(lm, tmp_path / "out")
    back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == type(hf).__name__
    ids, mask, types = _batch(family, seed=5)
    kw = {"token_type_ids": types} if family == "bert" else {}
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
        b = back(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)
    again = load_encoder_dir(tmp_path / "out")  # and lmforge reads its own export
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_padding_rows_do_not_change_real_tokens():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=32, dropout=0.0, attn_dropout=0.0)).eval()
    ids = torch.randint(3, V, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1).long()
    with torch.no_grad():
        torch.testing.assert_close(enc(ids)[0], enc(padded, mask)[0, :6], atol=1e-6, rtol=0)


def test_roberta_positions_skip_padding():
    cfg = EncoderConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=8, family="roberta", pad_token_id=1,
                        position_offset=2, type_vocab_size=1)
    ids = torch.tensor([[0, 31, 2, 1, 1]])
    assert position_ids_for(ids, cfg).tolist() == [[2, 3, 4, 1, 1]]
    assert cfg.max_length == cfg.max_position_embeddings - 2


def test_name_tables_round_trip():
    for family, table in NAMES.items():
        cfg = EncoderConfig(vocab_size=V, n_layer=3, n_head=2, n_embd=8, family=family,
                            type_vocab_size=0 if family == "distilbert" else 2, pooler=family != "distilbert")
        for name in Encoder(cfg).state_dict():
            hf_name = to_hf_name(name, table)
            assert hf_name is not None, name
            assert from_hf_name(hf_name, table) == name


def _head_outputs(lm, kind, ids, mask, types, family):
    """Our encoder + head module built from lm.head_state -> the output transformers' task model gives."""
    h = lm.model(ids, mask, types if family == "bert" else None)
    cfg = lm.config
    if kind == "mlm":
        head = MLMHead(cfg, lm.model.wte)
        head.load_state_dict(lm.head_state, strict=False)
        assert set(lm.head_state) | {"decoder.weight"} == set(head.state_dict())
        return head, head.eval()(h)
    if kind == "sequence_classification":
        head = SequenceClassificationHead(cfg, 3)
        head.load_state_dict(lm.head_state)
        return head, head.eval()(h, lm.model.pool(h) if family == "bert" else None)
    if kind == "token_classification":
        head = TokenClassificationHead(cfg, 3)
        head.load_state_dict(lm.head_state)
        return head, head.eval()(h)
    head = QuestionAnsweringHead(cfg)
    head.load_state_dict(lm.head_state)
    return head, torch.stack(head(h), -1)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("kind", ["mlm", "sequence_classification", "token_classification", "question_answering"])
def test_task_heads_match_transformers(family, kind, tmp_path):
    hf = _hf_model(family, kind, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    lm = load_encoder_dir(tmp_path / "hf")
    assert lm.head_kind == kind
    ids, mask, types = _batch(family, seed=2)
    kw = {"token_type_ids": types} if family == "bert" else {}
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, **kw)
        ref = out.logits if kind != "question_answering" else torch.stack([out.start_logits, out.end_logits], -1)
        head, ours = _head_outputs(lm, kind, ids, mask, types, family)
    if ref.dim() == 3:  # per-token outputs: compare the real tokens
        ref, ours = ref[mask.bool()], ours[mask.bool()]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # the head exports back into the same transformers class, with the same outputs
    export_encoder_hf(lm, tmp_path / "out", head_kind=kind, head=head)
    back = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    back = getattr(transformers, back.architectures[0]).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        out2 = back(input_ids=ids, attention_mask=mask, **kw)
    for name in ("logits", "start_logits", "end_logits"):
        if hasattr(out, name) and getattr(out, name) is not None:
            torch.testing.assert_close(getattr(out2, name), getattr(out, name), atol=1e-6, rtol=0)


def test_dtype_and_config_errors(saved, tmp_path):
    _, d = saved["bert"]
    lm = load_encoder_dir(d, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    cfg = json.loads((d / "config.json").read_text())
    for change, expect in [({"position_embedding_type": "relative_key"}, "position_embedding_type"),
                           ({"hidden_act": "swish"}, "hidden_act"), ({"num_hidden_layers": 3}, "missing tensor"),
                           ({"num_hidden_layers": 1}, "unexpected tensor"), ({"hidden_size": 64}, "shape")]:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        (bad / "model.safetensors").symlink_to(d / "model.safetensors")
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError) as e:
            load_encoder_dir(bad)
        assert expect in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ConfigError):
        EncoderConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError):
        EncoderConfig(family="electra")


def test_encoder_cannot_generate_and_rejects_long_input(saved):
    lm = load_encoder_dir(saved["bert"][1])
    for call in (lambda: lm.generate("hi"), lambda: lm.chat([{"role": "user", "content": "hi"}]),
                 lambda: lm.stream("hi")):
        with pytest.raises(GenerationError) as e:
            call()
        assert "encoder" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="longer than"):
        lm.model(torch.zeros(1, 41, dtype=torch.long))
    assert isinstance(GenerationError("x"), LmforgeError)
