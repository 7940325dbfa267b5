# lmforge — the two commands a new user needs are `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
JOBS   ?= 2

.PHONY: install test demo bench test-llamacpp clean

install: $(STAMP)

# torch is pinned in the same pip command as everything that depends on it, so pip never
# swaps in a multi-GB CUDA build (on this machine torch==2.13.0 is a CPU wheel already on disk).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

# transformers 5 dropped the question-answering, summarization, translation and text2text pipelines; the tests
# compare ours with transformers 4's, installed beside the venv (not in it) and run in a subprocess.
T4 := $(VENV)/transformers4
$(T4)/.stamp:
	$(PIP) install -q --target $(T4) --no-deps "transformers>=4.45,<5" "huggingface_hub<1" "tokenizers<0.23" \
		|| echo "transformers 4 not installed: the QA/seq2seq pipeline comparisons will skip"
	touch $(T4)/.stamp

test: install $(T4)/.stamp
	LMFORGE_TRANSFORMERS4=$(abspath $(T4)) $(PY) -m pytest -q -n $(JOBS) --timeout 600 tests

demo: install
	$(PY) -m lmforge.demo --overwrite  # the demo owns runs/demo: a rerun replaces it

bench: install
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# llama.cpp compiled from source by llama-cpp-python (~5 min on 2 cores): kept out of `make test`.
test-llamacpp: install
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q "torch==2.13.0" "llama-cpp-python[server]"  # [server]: the peer in benchmarks/bench_serve.py
	LMFORGE_LLAMACPP=1 $(PY) -m pytest -q tests -m llamacpp

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
