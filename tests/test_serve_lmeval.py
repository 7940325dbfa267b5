"""lm-evaluation-harness evaluates a served model the way users evaluate served models: its `local-completions`
model talks to our /v1/completions (log-likelihood through `echo` + `logprobs`, generation through plain
completions) and to our vLLM-style /tokenize endpoints ("remote" tokenizer). Two small local tasks (task YAML +
JSONL in tmp_path, no download); every number lm-eval reports per sample must equal what the library computes."""

from __future__ import annotations

import json
import logging

import pytest

from test_serve_helpers import build_tiny_model, start_server

lm_eval = pytest.importorskip("lm_eval")

MC = [
    {"question": "The quick brown", "choices": [" fox", " dog", " model"], "answer": 0},
    {"question": "A language model predicts the next", "choices": [" token", " sentence"], "answer": 0},
    {"question": "Once upon a", "choices": [" time", " model", " fox jumps"], "answer": 0},
]
GEN = [{"question": "The quick brown fox", "answer": " jumps"}, {"question": "Servers batch", "answer": " requests"}]

MC_YAML = """task: lmforge_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""

GEN_YAML = """task: lmforge_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def test_lm_eval_local_completions_against_the_server(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    srv, lm = start_server(build_tiny_model(tmp_path / "tiny"), max_batch=4)
    try:
        for name, rows, yaml in (("mc", MC, MC_YAML), ("gen", GEN, GEN_YAML)):
            data = tmp_path / f"{name}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            (tmp_path / f"{name}.yaml").write_text(yaml.format(data=data))
        out = simple_evaluate(
            model="local-completions",
            model_args=f"base_url={srv.url}/v1/completions,model=tiny,tokenizer_backend=remote,"
                       "num_concurrent=2,max_retries=1,max_length=1024",
            tasks=["lmforge_tiny_mc", "lmforge_tiny_gen"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    finally:
        srv.stop()

    # multiple choice: each choice's log-likelihood equals lm.score (ids: context then continuation, as lm-eval)
    samples = out["samples"]["lmforge_tiny_mc"]
    assert len(samples) == len(MC)
    correct = 0
    for s in samples:
        doc = s["doc"]
        scores = [lm.score(doc["question"], c) for c in doc["choices"]]
        got = [r[0] for r in s["resps"]]  # [(loglikelihood, is_greedy)] per choice
        assert [g[0] for g in got] == pytest.approx([sc.logprob for sc in scores], abs=1e-3)
        assert [bool(g[1]) for g in got] == [sc.is_greedy for sc in scores]
        best = max(range(len(scores)), key=lambda i: scores[i].logprob)
        correct += best == doc["answer"]
    assert out["results"]["lmforge_tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC))

    # generation: greedy completions equal lm.generate with the same stop string
    samples = out["samples"]["lmforge_tiny_gen"]
    assert len(samples) == len(GEN)
    for s in samples:
        ref = lm.generate(s["doc"]["question"], max_new_tokens=12, temperature=0, stop=["."])
        assert s["resps"][0][0] == str(ref)
