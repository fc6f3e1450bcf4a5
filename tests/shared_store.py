"""The e2e tests' shared study: one quickstart-sized Study B store that every test which only reads a study's
store reads (tests/e2e/test_end_to_end.py, test_end_to_end_promot.py, test_figures.py; fixture `shared_study` in
tests/e2e/conftest.py). Three formats, SFT and ProMoT (evaluated with and without its soft prompt), two epochs,
both judges, XSTest: what each of those tests checks. `harness run` on it is a background job
(tests/background.py), started with the session, so it runs beside the unit tests.
"""

from pathlib import Path

import yaml

from background import Job, harness

FORMATS = ["prose", "list", "json"]
METHODS = ["sft", "promot"]
EPOCHS = 2
TRAIN_SIZE, BATCH_SIZE = 4, 2
PROMPT_LENGTH = 4
HARMFUL_SOURCES = {"advbench": 1, "beavertails_eval": 1, "directharm4": 1}
XSTEST_SAFE, XSTEST_UNSAFE = 2, 1
JUDGES = ["keyword", "llm"]

SHARED_STUDY = {
    "name": "e2e",
    "model": "smollm2-135m-instruct",
    "seeds": [0],
    "data": {
        "formats": FORMATS,
        "train_size": TRAIN_SIZE,
        "val_size": 2,
        "test_size": 2,
        "harmful": {"sources": HARMFUL_SOURCES},
    },
    "train": {
        "methods": METHODS, "learning_rate": 3e-4, "batch_size": BATCH_SIZE, "grad_accum": 1, "epochs": EPOCHS,
        "warmup_steps": 1, "max_length": 192,
        "promot": {"prompt_length": PROMPT_LENGTH, "evaluate_with_prompt": True,
                   "stage1": {"learning_rate": 0.01, "batch_size": BATCH_SIZE, "grad_accum": 1, "epochs": 0.5,
                              "warmup_steps": 0}},
    },
    "eval": {
        "batch_size": 32,
        "decoding": [{"temperature": 0, "max_new_tokens": 8}],
        "judges": [{"name": "keyword"},
                   {"name": "llm", "model": "smollm2-135m-instruct", "max_new_tokens": 6, "template": "harm_judge_short.txt"}],
        "xstest": {"safe": XSTEST_SAFE, "unsafe": XSTEST_UNSAFE},
    },
}


def _steps(workdir: Path):
    (workdir / "study.yaml").write_text(yaml.safe_dump(SHARED_STUDY))
    return [harness("run", "study.yaml")]


JOB = Job("shared-study", _steps, readers=("shared_study",))
