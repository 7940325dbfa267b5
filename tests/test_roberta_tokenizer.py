"""RoBERTa/BART byte-level BPE: ids, offsets and word ids equal transformers' RobertaTokenizer (tokenizer.json, with
and without add_prefix_space) and transformers 4's RobertaTokenizerFast/BartTokenizerFast (vocab.json + merges.txt);
pairs, truncation, padding, the batch call; `lmforge.load` of a RoBERTa directory fills masks as transformers'
fill-mask pipeline does. Test tokenizers are built offline from GPT-2's files in ../shared/data/gpt2."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import TokenizerError
from lmforge.tokenizers.roberta import RobertaTokenizer, trim_offsets

transformers = pytest.importorskip("transformers")
from tokenizers import AddedToken  # noqa: E402  (installed with transformers)

GPT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"
if not GPT2.exists():
    GPT2 = Path("/work/shared/data/gpt2")
pytestmark = pytest.mark.skipif(not (GPT2 / "encoder.json").exists(), reason="GPT-2 BPE files not found")

TEXTS = ["Paris is the <mask> of France.", "Hello  world", " x", "\nfoo", "héllo wörld 日本語 🤗", "a<s>b</s>c",
         "x  <mask>y", "x\t<mask>", "<mask>", " <mask> ", "   ", "It's 2024; don't   stop!!\n\nNew para.",
         "e\u0301 combining", "tab\tand\r\nCRLF", "<mask><mask>", "a </s> b", "<pad>x<unk>", "ab<maskx",
         "Ünïcödé — “quotes” and ellipsis…", "numbers 1234567 3.14159 and 1,000,000", "emoji 👩‍👩‍👧 zwj"]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcXYZ  \t\n.,!'é日🤗<>/sm") + ["<mask>", "<s>", "</s>", " <mask>", "don't", " the"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def gpt2_vocab_merges(n_merges: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """RoBERTa's layout of GPT-2's BPE: <s> <pad> </s> <unk> first, GPT-2's tokens after them, <mask> last.
    n_merges keeps the 256 bytes and the first n merges (a small vocabulary for tiny models)."""
    enc = json.loads((GPT2 / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (GPT2 / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
              if line]
    if n_merges is not None:
        merges = merges[:n_merges]
    keep = 256 + len(merges)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for t, i in sorted(enc.items(), key=lambda kv: kv[1]):
        if t != "<|endoftext|>" and i < keep:
            vocab[t] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return vocab, merges


def make_tokenizer_dir(d: Path, add_prefix_space: bool = False, n_merges: int | None = None, cls=None) -> Path:
    """A tokenizer.json directory written by transformers' own RobertaTokenizer (or BartTokenizer)."""
    vocab, merges = gpt2_vocab_merges(n_merges)
    cls = cls or transformers.RobertaTokenizer
    tok = cls(vocab=vocab, merges=merges, add_prefix_space=add_prefix_space,
              mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
    tok.save_pretrained(str(d))
    return d


def make_vocab_merges_dir(d: Path, n_merges: int | None = None) -> Path:
    vocab, merges = gpt2_vocab_merges(n_merges)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return d


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "add_prefix_space"])
def tok_dir(request, tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("roberta_tok"), add_prefix_space=request.param)


def _view(enc, i=None):
    ids = enc["input_ids"] if i is None else enc["input_ids"][i]
    offs = enc["offset_mapping"] if i is None else enc["offset_mapping"][i]
    words = enc.word_ids() if i is None else enc.word_ids(i)
    return list(ids), [tuple(o) for o in offs], list(words)


def test_ids_offsets_word_ids_equal_transformers(tok_dir):
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ours = RobertaTokenizer.load(tok_dir)
    for t in TEXTS + _random_texts(300):
        assert _view(ours(t, return_offsets_mapping=True)) == _view(hf(t, return_offsets_mapping=True)), repr(t)
        assert ours.decode(ours.encode(t), skip_special_tokens=False) == hf.decode(hf(t)["input_ids"])
        assert ours.tokenize(t) == hf.tokenize(t)


def test_pairs_truncation_padding_batch_equal_transformers(tok_dir):
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ours = RobertaTokenizer.load(tok_dir)
    firsts = TEXTS[:12] + ["a long first text " * 5]
    seconds = TEXTS[12:] + _random_texts(12 - len(TEXTS[12:]) + 1, seed=3)
    seconds = seconds[:len(firsts)]
    for kw in [{}, dict(truncation=True, max_length=12), dict(truncation="only_second", max_length=40),
               dict(truncation="longest_first", max_length=9), dict(padding=True),
               dict(padding="max_length", truncation=True, max_length=16)]:
        a = ours(firsts, seconds, return_offsets_mapping=True, **kw)
        b = hf(firsts, seconds, return_offsets_mapping=True, **kw)
        for i in range(len(firsts)):
            assert _view(a, i) == _view(b, i), (kw, firsts[i], seconds[i])
            assert a.sequence_ids(i) == b.sequence_ids(i)
        assert a["attention_mask"] == b["attention_mask"]
    # the batch call every lmforge tokenizer shares, with tensors, and truncation reported
    a = ours(TEXTS, padding=True, truncation=True, max_length=8, return_tensors="pt")
    b = hf(TEXTS, padding=True, truncation=True, max_length=8, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert a.num_truncated == [max(0, len(hf(t)["input_ids"]) - 8) for t in TEXTS]


def test_bart_tokenizer_is_the_same(tmp_path):
    d = make_tokenizer_dir(tmp_path, cls=transformers.BartTokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = RobertaTokenizer.load(d)
    for t in TEXTS:
        assert ours(t)["input_ids"] == hf(t)["input_ids"]
    assert ours.encode("Hello", "world") == hf("Hello", "world")["input_ids"]


_ORACLE = """
import json, sys, transformers
args = json.loads(sys.argv[1])
out = {}
for name in ("RobertaTokenizerFast", "BartTokenizerFast"):
    tok = getattr(transformers, name).from_pretrained(args["dir"])
    out[name] = [tok(t, return_offsets_mapping=True)["input_ids"] for t in args["texts"]]
    out[name + "_offsets"] = [tok(t, return_offsets_mapping=True)["offset_mapping"] for t in args["texts"]]
print(json.dumps(out))
"""


def test_vocab_merges_pair_equals_transformers4(tmp_path):
    """vocab.json + merges.txt without tokenizer.json: transformers 4's fast tokenizers are the reference
    (transformers 5 builds this pair without RoBERTa's lstrip on <mask>)."""
    d = make_vocab_merges_dir(tmp_path / "vm", n_merges=3000)
    texts = TEXTS + _random_texts(100, seed=5)
    ours = RobertaTokenizer.load(d)
    # without <mask>, transformers 5 agrees too (in process)
    hf5 = transformers.RobertaTokenizer.from_pretrained(str(d))
    for t in texts:
        if "<mask>" not in t:
            assert ours.encode(t) == hf5(t)["input_ids"], repr(t)
    path = os.environ.get("LMFORGE_TRANSFORMERS4")
    if not path:
        pytest.skip("set LMFORGE_TRANSFORMERS4 to a transformers 4 directory to compare <mask> handling with it")
    env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _ORACLE, json.dumps({"dir": str(d), "texts": texts})], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("RobertaTokenizerFast", "BartTokenizerFast"):
        for t, ids, offs in zip(texts, theirs[name], theirs[name + "_offsets"]):
            e = ours(t, return_offsets_mapping=True)
            assert e["input_ids"] == ids, (name, t)
            assert [tuple(o) for o in e["offset_mapping"]] == [tuple(o) for o in offs], (name, t)


def test_save_load_round_trip_loads_in_transformers(tok_dir, tmp_path):
    ours = RobertaTokenizer.load(tok_dir)
    ours.save(tmp_path / "out")
    again = RobertaTokenizer.load(tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for t in TEXTS:
        assert again.encode(t) == ours.encode(t) == hf(t)["input_ids"]
    (tmp_path / "out" / "tokenizer.json").unlink()  # the vocab.json + merges.txt pair it also wrote
    pair = RobertaTokenizer.load(tmp_path / "out")
    assert [pair.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]


def test_helpers_and_errors(tmp_path):
    assert trim_offsets("Ġworld", 5, 11, False) == (6, 11)
    assert trim_offsets("Ġx", 0, 2, True) == (0, 2)
    assert trim_offsets("Ġ", 3, 4, False) == (4, 4)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        RobertaTokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text('{"<s>": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="merges.txt:2"):
        RobertaTokenizer.load(tmp_path)
    vocab, merges = gpt2_vocab_merges(10)
    tok = RobertaTokenizer(vocab, merges)
    built = RobertaTokenizer.from_gpt2_files(GPT2 / "encoder.json", GPT2 / "vocab.bpe", n_merges=10)
    assert built.vocab == vocab and built.merges == merges
    with pytest.raises(TokenizerError, match="expected a string"):
        tok(123)
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([10**6])
    vocab.pop("<pad>")
    with pytest.raises(TokenizerError, match="pad_token"):
        RobertaTokenizer(vocab, merges)


# ----------------------------------------------------------------------------------------------------------------
# lmforge.load of a RoBERTa directory, end to end
# ----------------------------------------------------------------------------------------------------------------
def _roberta_mlm_dir(d: Path, add_prefix_space: bool = False) -> Path:
    make_tokenizer_dir(d, add_prefix_space=add_prefix_space, n_merges=400)
    vocab_size = len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=80,
                                     type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = transformers.RobertaForMaskedLM(cfg).eval()
    with torch.no_grad():  # a less flat head than the random init, so the top-k order is well defined
        model.lm_head.decoder.weight.normal_(0.0, 0.5)
    model.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("add_prefix_space", [False, True])
def test_load_roberta_dir_fill_mask_equals_transformers(tmp_path, add_prefix_space):
    d = _roberta_mlm_dir(tmp_path / "rob", add_prefix_space)
    lm = lmforge.load(d)
    assert isinstance(lm.tokenizer, RobertaTokenizer)
    texts = ["Paris is the <mask> of France.", "The <mask> sat on the mat.", "Héllo <mask>!"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(str(d)).eval()
    fill = transformers.pipeline("fill-mask", model=hf_model, tokenizer=hf_tok)
    for text in texts:
        ours = lmforge.pipeline("fill-mask", lm)(text, top_k=5)
        theirs = fill(text, top_k=5)
        assert [r["token"] for r in ours] == [r["token"] for r in theirs]
        assert [r["token_str"] for r in ours] == [r["token_str"] for r in theirs]
        assert [r["sequence"] for r in ours] == [r["sequence"] for r in theirs]
        assert [r["score"] for r in ours] == pytest.approx([r["score"] for r in theirs], abs=1e-5)
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    mine = lm.tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], mine["input_ids"])


def test_distilbert_dir_still_loads(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "!", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.DistilBertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tok.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=len(vocab), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                        max_position_embeddings=32)
    transformers.DistilBertForMaskedLM(cfg).save_pretrained(str(tmp_path))
    lm = lmforge.load(tmp_path)
    assert type(lm.tokenizer).__name__ == "WordPieceTokenizer"
    assert lm.tokenizer("hello worlds!")["input_ids"] == tok("hello worlds!")["input_ids"]
