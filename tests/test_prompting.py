"""Few-shot prompting and in-context classification (`lmforge.tasks.prompting`, `lmforge fewshot`).

References: the label log-likelihoods equal transformers' (AutoModelForCausalLM + AutoTokenizer on the same tiny
random GPT-2 and Llama directories, exported by lmforge) to 1e-4, for plain and chat prompts; the chat prompt is
the text transformers' `apply_chat_template` renders; accuracy, balanced accuracy and the confusion matrix equal
scikit-learn's; demonstrations are seeded, balanced and distinct; generated answers are parsed the same batched
as one at a time; the CLI writes its metrics and plots and refuses bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.errors import ConfigError, DataError
from lmforge.formats.hf import export_hf
from lmforge.generation import api
from lmforge.tasks.prompting import (Example, PromptFormat, UNPARSED, balanced_subset, build_prompt,
                                          chat_messages, classification_scores, classify_by_generate,
                                          classify_by_score, draw_shots, evaluate_fewshot, examples_from_records,
                                          label_continuation, load_examples, model_input, parse_label,
                                          render_plain)
from lmforge.lm import LM
from lmforge.models.config import ModelConfig
from lmforge.models.decoder import Transformer
from lmforge.tokenizers.bpe import Tokenizer
from lmforge.tokenizers.chat_template import CHATML_TEMPLATE

transformers = pytest.importorskip("transformers")

POOL = [Example("Ok lar... Joking wif u oni", "ham"), Example("WINNER!! Claim your prize now, call 0800", "spam"),
        Example("I'll be home by 7, save me some dinner", "ham"), Example("Free entry: text WIN to 80086", "spam"),
        Example("Are you coming to the gym tomorrow?", "ham"), Example("URGENT! Your mobile won £2000", "spam"),
        Example("Sorry, I'll call later", "ham")]
TEST = [Example("Call now to claim your free ringtone", "spam"), Example("See you at lunch", "ham"),
        Example("Congratulations, you have been selected", "spam"), Example("Can't talk, driving", "ham")]


# ---- the same tiny random models, in lmforge and in transformers ----------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    """{kind: (lmforge LM loaded from the exported dir, transformers model, transformers tokenizer)}."""
    from conftest import data_file

    tok = Tokenizer.from_gpt2_files(data_file("gpt2/encoder.json"), data_file("gpt2/vocab.bpe"))
    out = {}
    for kind in ("gpt", "llama"):
        torch.manual_seed(0)
        if kind == "gpt":
            cfg = ModelConfig.from_name("gpt-tiny", vocab_size=50257, block_size=256, n_layer=2, n_embd=32,
                                        init_std=0.2)
        else:
            cfg = ModelConfig.from_name("llama-tiny", vocab_size=50257, block_size=256, n_layer=2, n_embd=32,
                                        n_head=4, n_kv_head=2, intermediate_size=64, init_std=0.2)
        d = tmp_path_factory.mktemp(kind) / "hf"
        export_hf(LM(Transformer(cfg).eval(), tok, cfg, chat_template=CHATML_TEMPLATE), d)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(d)
        out[kind] = (lmforge.load(d), hf_model, hf_tok)
    return out


def hf_logprob(model, tok, prompt, continuation: str) -> tuple[float, list[int]]:
    """log p(continuation | prompt) with transformers, split as lm-evaluation-harness splits it: the whole text
    tokenized once, the continuation being the tokens after the prompt's own. A prompt given as ids is used as is."""
    if isinstance(prompt, str):
        whole = tok(prompt + continuation, add_special_tokens=False)["input_ids"]
        ctx = tok(prompt, add_special_tokens=False)["input_ids"]
        assert whole[:len(ctx)] == ctx
        cont = whole[len(ctx):]
    else:
        ctx, cont = list(prompt), tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]  # (T, V)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)), cont


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("style", ["plain", "chat"])
@pytest.mark.parametrize("k", [0, 3])
def test_label_logprobs_equal_transformers(exported, kind, style, k):
    lm, hf_model, hf_tok = exported[kind]
    fmt = PromptFormat(style=style, instruction="Is this SMS spam or ham?")
    shots = draw_shots(POOL, k, seed=k, balanced=True)
    prompts = [model_input(lm, build_prompt(shots, ex.input, fmt, lm), fmt) for ex in TEST]
    labels = ["ham", "spam"]
    preds, rows = classify_by_score(lm, prompts, labels, fmt, batch_size=3)
    for prompt, row, pred in zip(prompts, rows, preds):
        for label, ours in zip(labels, row):
            theirs, cont = hf_logprob(hf_model, hf_tok, prompt, label_continuation(label, fmt))
            assert ours == pytest.approx(theirs, abs=1e-4)
            assert api.score(lm, prompt, label_continuation(label, fmt)).token_ids == cont
        assert pred == labels[max(range(2), key=row.__getitem__)]


def test_chat_prompt_is_what_transformers_renders(exported):
    lm, _, hf_tok = exported["llama"]
    fmt = PromptFormat(style="chat", instruction="Label each message spam or ham.")
    shots = draw_shots(POOL, 4, seed=1, balanced=True)
    ours = build_prompt(shots, "hello there", fmt, lm)
    theirs = hf_tok.apply_chat_template(chat_messages(shots, "hello there", fmt), tokenize=False,
                                        add_generation_prompt=True)
    assert ours == theirs
    assert [m["role"] for m in chat_messages(shots, "q", fmt)] == ["system"] + ["user", "assistant"] * 4 + ["user"]


# ---- demonstrations ------------------------------------------------------------------------------------------
def test_draw_shots_is_seeded_balanced_and_distinct():
    pool = [Example(f"text {i}", "spam" if i % 5 == 0 else "ham") for i in range(200)]  # 20% spam
    for k in (0, 1, 2, 4, 7):
        a = draw_shots(pool, k, seed=3, balanced=True)
        assert a == draw_shots(pool, k, seed=3, balanced=True) and len(set(a)) == k
        counts = [sum(e.label == x for e in a) for x in ("ham", "spam")]
        assert abs(counts[0] - counts[1]) <= 1
    assert draw_shots(pool, 8, seed=1) != draw_shots(pool, 8, seed=2)
    unbalanced = draw_shots(pool, 50, seed=0)
    assert len(set(unbalanced)) == 50 and all(e in pool for e in unbalanced)
    last_labels = {draw_shots(pool, 4, seed=s, balanced=True)[-1].label for s in range(10)}
    assert last_labels == {"ham", "spam"}  # shuffled: the last demonstration is not always the same label
    with pytest.raises(ConfigError, match="pool holds only 200"):
        draw_shots(pool, 201)
    test = balanced_subset(pool, 10, seed=0)
    assert sorted(e.label for e in test) == ["ham"] * 10 + ["spam"] * 10


def test_plain_prompt_layout():
    text = render_plain([Example("a", "ham"), Example("b", "spam")], "c", PromptFormat(instruction="Spam?"))
    assert text == "Spam?\n\nInput: a\nLabel: ham\n\nInput: b\nLabel: spam\n\nInput: c\nLabel:"
    assert build_prompt([], "c") == "Input: c\nLabel:"
    with pytest.raises(ConfigError, match="'plain' or 'chat'"):
        PromptFormat(style="html")


def test_examples_from_every_data_shape(tmp_path, shared_data):
    sms = load_examples(shared_data("sms_spam_collection/SMSSpamCollection"))
    assert len(sms) == 5574 and {e.label for e in sms} == {"ham", "spam"}
    assert sum(e.label == "spam" for e in sms) == 747
    alpaca = load_examples(shared_data("instruction-data.json"))
    assert len(alpaca) == 1100 and alpaca[0].label.startswith("The spelling")
    assert alpaca[0].input == "Evaluate the following phrase by transforming it into the spelling given.\n\n" \
                              "freind --> friend"
    p = tmp_path / "d.jsonl"
    p.write_text('{"sentence": "good film", "sentiment": "pos"}\n{"sentence": "dull", "sentiment": "neg"}\n')
    assert load_examples(p, "sentence", "sentiment") == [Example("good film", "pos"), Example("dull", "neg")]
    with pytest.raises(DataError, match="record 0 has no 'text' field"):
        load_examples(p)
    assert examples_from_records([{"text": "x", "label": " spam\n"}]) == [Example("x", "spam")]


# ---- metrics and answers ---------------------------------------------------------------------------------------
def test_scores_equal_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = torch.Generator().manual_seed(0)
    labels = ["a", "b", "c"]
    y_true = [labels[i] for i in torch.randint(0, 3, (300,), generator=rng).tolist()]
    y_pred = [labels[i] for i in torch.randint(0, 3, (300,), generator=rng).tolist()]
    y_pred[:40] = y_true[:40]
    acc, bal, m, cols = classification_scores(y_true, y_pred, labels)
    assert acc == pytest.approx(sklearn.accuracy_score(y_true, y_pred))
    assert bal == pytest.approx(sklearn.balanced_accuracy_score(y_true, y_pred))
    assert m == sklearn.confusion_matrix(y_true, y_pred, labels=labels).tolist() and cols == labels
    # an unparsed answer is a wrong answer in its own column
    y_none = [None if i % 7 == 0 else p for i, p in enumerate(y_pred)]
    acc, bal, m, cols = classification_scores(y_true, y_none, labels)
    filled = [p if p is not None else UNPARSED for p in y_none]
    assert cols == labels + [UNPARSED]
    assert acc == pytest.approx(sklearn.accuracy_score(y_true, filled))
    assert m == sklearn.confusion_matrix(y_true, filled, labels=cols).tolist()[:3]
    assert bal == pytest.approx(sum(m[i][i] / sum(m[i]) for i in range(3)) / 3)
    with pytest.raises(DataError, match="not one of the labels"):
        classification_scores(["z"], ["a"], labels)


def test_parse_label():
    labels = ["ham", "spam", "not spam"]
    assert parse_label(" Spam!", labels) == "spam"
    assert parse_label("\n  not spam, I think", labels) == "not spam"  # the longest label that fits
    assert parse_label('"ham"', labels) == "ham"
    assert parse_label("hamster", ["ham"]) == "ham"
    assert parse_label("I don't know", labels) is None and parse_label("", labels) is None


def test_generate_method_batched_equals_one_at_a_time(exported):
    lm = exported["gpt"][0]
    for style in ("plain", "chat"):
        fmt = PromptFormat(style=style)
        shots = draw_shots(POOL, 2, seed=0, balanced=True)
        prompts = [model_input(lm, build_prompt(shots, ex.input, fmt, lm), fmt) for ex in TEST]
        labels = ["ham", "spam"]
        batched = classify_by_generate(lm, prompts, labels, fmt, batch_size=4)
        alone = [classify_by_generate(lm, [p], labels, fmt, batch_size=1)[0] for p in prompts]
        assert batched == alone
        r = evaluate_fewshot(lm, shots, TEST, labels, method="generate", fmt=fmt)
        assert r.predictions == batched and r.unparsed == sum(p is None for p in batched)
        assert r.n == 4 and sum(map(sum, r.confusion)) == 4


def test_score_method_result(exported):
    lm = exported["llama"][0]
    r = evaluate_fewshot(lm, draw_shots(POOL, 2, seed=0, balanced=True), TEST, method="score")
    assert r.labels == ["ham", "spam"] and r.unparsed == 0 and r.columns == ["ham", "spam"]
    assert r.predictions == [r.labels[max(range(2), key=row.__getitem__)] for row in r.label_logprobs]
    acc, bal, m, _ = classification_scores([e.label for e in TEST], r.predictions, r.labels)
    assert (r.accuracy, r.balanced_accuracy, r.confusion) == (acc, bal, m)
    with pytest.raises(ConfigError, match="'score' or 'generate'"):
        evaluate_fewshot(lm, [], TEST, method="vote")


def test_calibration_divides_out_the_content_free_prior(exported):
    """Zhao et al. 2021: p_cf(label) from the content-free queries, renormalized over the labels and averaged;
    predictions are argmax of log p(label | prompt) - log p_cf(label). Recomputed here with api.score."""
    import math

    lm = exported["gpt"][0]
    labels = ["ham", "spam"]
    shots = draw_shots(POOL, 2, seed=0, balanced=True)
    r = evaluate_fewshot(lm, shots, TEST, labels, calibrate=True)
    per_query = []
    for q in ("N/A", "", "[MASK]"):
        lps = [api.score(lm, render_plain(shots, q), " " + x).logprob for x in labels]
        z = sum(math.exp(v) for v in lps)
        per_query.append([math.exp(v) / z for v in lps])
    prior = [sum(p[j] for p in per_query) / 3 for j in range(2)]
    assert r.calibrated and r.label_prior == pytest.approx(prior, abs=1e-6)
    expected = [labels[max(range(2), key=lambda j: row[j] - math.log(prior[j]))] for row in r.label_logprobs]
    assert r.predictions == expected
    with pytest.raises(ConfigError, match="needs method 'score'"):
        evaluate_fewshot(lm, shots, TEST, labels, method="generate", calibrate=True)


# ---- CLI -------------------------------------------------------------------------------------------------------
def test_cli_fewshot(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt-tiny", vocab_size=257, block_size=512, n_layer=2, n_embd=32, init_std=0.2)
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens={"<|endoftext|>": 256},
                    eos_token="<|endoftext|>")
    model = tmp_path / "model"
    LM(Transformer(cfg).eval(), tok, cfg).save(model)
    data = tmp_path / "sms.tsv"
    data.write_text("".join(f"{e.label}\t{e.input}\n" for e in POOL * 3 + TEST * 3), encoding="utf-8")
    out = tmp_path / "fs"
    argv = ["fewshot", model, "--data", data, "--shots", "0,2", "--per-label", "3", "--seeds", "0,1", "--out", out]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "2-shot mean over 2 seeds" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert [s["shots"] for s in report["summary"]] == [0, 2] and len(report["runs"]) == 4
    assert report["n_test"] == 6 and report["chance_balanced_accuracy"] == 0.5
    assert (out / "confusion_0shot.png").stat().st_size > 1000 and (out / "confusion_2shot.png").exists()
    for bad, msg in [(["--method", "vote"], "'score' or 'generate'"), ([], "already holds a metrics.json"),
                     (["--style", "xml"], "'plain' or 'chat'"), (["--shots", "0,x"], "cannot read")]:
        assert main([str(a) for a in argv + bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1, err
