"""Toxicity scorers: the Perspective backend against a local server speaking `comments:analyze` (429, 5xx,
caching, rate limit), the local-classifier backend on a tiny random classifier saved to disk, and the Detoxify
backend (the real `detoxify` package) on a tiny random BERT saved as a Detoxify checkpoint."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.errors import HarnessError
from harness.evals.toxicity import (DetoxifyScorer, LocalClassifierScorer, PerspectiveScorer, ScoreCache, make_scorer,
                                   toxicity_metrics)

from helpers import tiny_toxicity_classifier


class FakePerspective(BaseHTTPRequestHandler):
    """POST /v1alpha1/comments:analyze?key=K with the real request/response JSON; `script` queues failures."""

    script: list = []
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        if not self.path.startswith("/v1alpha1/comments:analyze?key=test-key"):
            return self.reply(403, {"error": {"code": 403, "message": "API key not valid.", "status": "PERMISSION_DENIED"}})
        if type(self).script:
            code = type(self).script.pop(0)
            status = {429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 500: "INTERNAL"}.get(code, "INVALID_ARGUMENT")
            return self.reply(code, {"error": {"code": code, "message": "scripted", "status": status}})
        text = body["comment"]["text"]
        if text.startswith("bonjour"):
            return self.reply(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message":
                                              "Attribute TOXICITY does not support request languages: fr",
                                              "details": [{"errorType": "LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE"}]}})
        assert body["requestedAttributes"] == {"TOXICITY": {}} and body["languages"] == ["en"]
        value = min(1.0, text.count("!") / 4)
        self.reply(200, {"attributeScores": {"TOXICITY": {
            "spanScores": [{"begin": 0, "end": len(text), "score": {"value": value, "type": "PROBABILITY"}}],
            "summaryScore": {"value": value, "type": "PROBABILITY"}}}, "languages": ["en"], "detectedLanguages": ["en"]})

    def reply(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakePerspective.script, FakePerspective.requests = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakePerspective)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1alpha1/comments:analyze"
    httpd.shutdown()


def scorer(endpoint, tmp_path, **options):
    options = {"requests_per_second": 50, "backoff": 0.01, **options}
    return PerspectiveScorer("test-key", endpoint=endpoint, cache=ScoreCache(tmp_path / "tox.sqlite"), **options)


def test_perspective_scores_retries_and_caches(server, tmp_path):
    FakePerspective.script = [429, 503, 500]  # three failures, then answers
    tox = scorer(server, tmp_path)
    assert tox.version == "perspective-v1alpha1:TOXICITY:lang=en"
    scores = tox.score(["fine", "bad!!", "", "fine", "bonjour"])
    assert scores == [0.0, 0.5, 0.0, 0.0, None]  # empty: no request; repeated text: one request; fr: None
    assert [body["comment"]["text"] for _, body in FakePerspective.requests] == ["fine"] * 4 + ["bad!!", "bonjour"]
    assert all(body["doNotStore"] is True for _, body in FakePerspective.requests)
    FakePerspective.requests.clear()
    again = scorer(server, tmp_path).score(["bad!!", "fine"])  # a new scorer reads the on-disk cache
    assert again == [0.5, 0.0] and FakePerspective.requests == []
    assert toxicity_metrics(scores) == {"toxicity_failures": 1.0, "n_prompts": 5.0, "toxicity_mean": 0.125,
                                        "toxicity_max": 0.5}


def test_perspective_gives_up_and_refuses_clearly(server, tmp_path):
    FakePerspective.script = [503] * 3
    with pytest.raises(HarnessError, match="failed after 3 attempts.*HTTP 503"):
        scorer(server, tmp_path, max_retries=2).score(["x"])
    bad_key = PerspectiveScorer("wrong", endpoint=server, backoff=0.01)
    with pytest.raises(HarnessError, match="refused the request.*HTTP 403"):
        bad_key.score(["x"])
    with pytest.raises(HarnessError, match="PERSPECTIVE_API_KEY"):
        PerspectiveScorer(None)


def test_perspective_rate_limit(server, tmp_path):
    tox = scorer(server, tmp_path, requests_per_second=20)
    start = time.monotonic()
    tox.score([f"text {i}" for i in range(6)])
    assert time.monotonic() - start >= 5 / 20 - 0.01  # six requests, at least 50 ms apart


def test_local_classifier_from_a_saved_folder(tmp_path):
    path = tiny_toxicity_classifier(tmp_path / "clf")
    tox = LocalClassifierScorer(path, cache=ScoreCache(tmp_path / "c.sqlite"))
    scores = tox.score(["you are great", "you are awful", "you are great"])
    assert all(0 <= s <= 1 for s in scores) and scores[0] == scores[2]
    assert tox.version.startswith("local:clf@")
    with pytest.raises(HarnessError, match="no label 'hateful'"):
        LocalClassifierScorer(path, label="hateful")
    with pytest.raises(HarnessError, match="not a folder"):
        LocalClassifierScorer(tmp_path / "missing")


TEXTS = ["you are great", "you are an idiot", "i hate this so", "nice person"]
JIGSAW_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]  # as in Detoxify's 'original'


def detoxify_checkpoint(path, state_dict, base_model):
    """A checkpoint in the format `detoxify.load_checkpoint` reads (what its convert_weights.py writes)."""
    import torch

    torch.save({"config": {"name": "Jigsaw_BERT",
                           "arch": {"type": "BERT", "args": {"num_classes": 6, "model_type": base_model,
                                                             "model_name": "BertForSequenceClassification",
                                                             "tokenizer_name": "BertTokenizer"}},
                           "dataset": {"type": "JigsawDataOriginal", "args": {"classes": JIGSAW_CLASSES}}},
                "state_dict": state_dict}, path)
    return path


@pytest.fixture(scope="module")
def detox(tmp_path_factory):
    """A 2-layer random BERT with 6 sigmoid outputs: its base-model folder (config.json of a plain BERT, i.e.
    2 labels, and a WordPiece tokenizer without a length limit), the model itself, and two checkpoints: one
    naming the base model by its folder (Detoxify loads it as is) and one naming it `bert-base-uncased`, like
    the released checkpoints (offline it needs base_model_path)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("detoxify")
    words = "you are a an the great awful idiot nice person stupid kind i hate love this is so".split()
    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(root / "vocab")  # WordPiece over the file (transformers 4 and 5)
    assert all(tokenizer.unk_token_id not in ids for ids in tokenizer(TEXTS)["input_ids"])
    config = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.5)
    base = root / "bert-base"
    config.save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    config.num_labels = 6
    model = BertForSequenceClassification(config).eval()
    state_dict = model.state_dict()
    return {"base": base, "model": model, "tokenizer": tokenizer,
            "local": detoxify_checkpoint(root / "local.ckpt", state_dict, str(base)),
            "hub": detoxify_checkpoint(root / "toxic_tiny-0123abcd.ckpt", state_dict, "bert-base-uncased")}


def test_detoxify_scores_as_detoxify_does_and_caches(detox, tmp_path):
    import torch
    from detoxify import Detoxify

    tox = DetoxifyScorer(detox["local"], cache=ScoreCache(tmp_path / "c.sqlite"))
    scores = tox.score(TEXTS)
    assert len(scores) == len(TEXTS) and all(isinstance(s, float) and 0 <= s <= 1 for s in scores)
    assert scores == Detoxify(checkpoint=str(detox["local"])).predict(TEXTS)["toxicity"]
    with torch.no_grad():  # the checkpoint's weights, not a fresh head: output 0 of the model that was saved
        logits = detox["model"](**detox["tokenizer"](TEXTS, padding=True, return_tensors="pt")).logits
    assert scores == pytest.approx(torch.sigmoid(logits[:, 0]).tolist(), abs=1e-6)
    assert len(set(scores)) == len(TEXTS)  # the texts reach the model
    assert tox.version.startswith("detoxify:local.ckpt@") and tox.version.endswith(":toxicity")

    again = DetoxifyScorer(detox["local"], batch_size=2, cache=ScoreCache(tmp_path / "c.sqlite"))
    predicted, predict = [], again.detoxify.predict
    again.detoxify.predict = lambda texts: predicted.append(list(texts)) or predict(texts)
    more = again.score([*TEXTS, "so stupid", "you are great"])  # a new scorer reads the on-disk cache
    assert more[:4] == scores and more[5] == scores[0] and predicted == [["so stupid"]]
    assert isinstance(more[4], float)  # a batch of one text (Detoxify then returns a number, not a list)
    assert again.score(["so stupid"]) == [more[4]] and predicted == [["so stupid"]]


def test_detoxify_offline_with_a_local_base_model(detox):
    from detoxify import Detoxify

    # the released checkpoints name their base model on the hub; base_model_path stands in for it (the
    # folder's config.json has 2 labels: the 6 outputs come from the checkpoint)
    tox = DetoxifyScorer(detox["hub"], base_model=detox["base"])
    assert tox.score(TEXTS) == Detoxify(checkpoint=str(detox["local"])).predict(TEXTS)["toxicity"]
    assert tox.version.startswith("detoxify:toxic_tiny-0123abcd.ckpt@")
    severe = DetoxifyScorer(detox["hub"], base_model=detox["base"], label="severe_toxic")  # Jigsaw's name
    assert severe.version.endswith(":severe_toxicity")
    assert severe.score(TEXTS) == Detoxify(checkpoint=str(detox["local"])).predict(TEXTS)["severe_toxicity"]
    long_reply = " ".join(["you are so stupid"] * 100)  # 400 tokens > the 64 positions: truncated, not a crash
    assert 0 <= tox.score([long_reply])[0] <= 1


def test_detoxify_errors_are_one_line(detox, tmp_path):
    def error(**kwargs) -> str:
        with pytest.raises(HarnessError) as caught:
            DetoxifyScorer(**kwargs)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    missing = tmp_path / "toxic_original-c1212f89.ckpt"
    assert f"toxicity model_path {missing}: no such file" in error(checkpoint=missing)
    assert f"toxicity base_model_path {tmp_path}" in error(checkpoint=detox["hub"], base_model=tmp_path)
    assert "no output 'hateful'" in error(checkpoint=detox["local"], label="hateful")
    assert "detoxify_model 'huge' is not a released Detoxify model" in error(model="huge")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    assert f"cannot load Detoxify from {tmp_path / 'notes.ckpt'}: UnpicklingError" in error(checkpoint=tmp_path / "notes.ckpt")
    gone = detoxify_checkpoint(tmp_path / "gone.ckpt", detox["model"].state_dict(), str(tmp_path / "no-base"))
    assert f"cannot load Detoxify from {gone}: " in error(checkpoint=gone)
    import torch

    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    assert "not a Detoxify checkpoint" in error(checkpoint=tmp_path / "bare.ckpt", base_model=detox["base"])
    assert error(checkpoint=tmp_path / "bare.ckpt") == (  # Detoxify's own check, its message's spacing collapsed
        f"cannot load Detoxify from {tmp_path / 'bare.ckpt'}: ValueError: Checkpoint needs to contain the config it "
        "was trained with as well as the state dict; offline, set base_model_path to a local copy of the base model "
        "the checkpoint names")


def test_detoxify_backend_from_the_config(detox):
    from harness.config import ToxicityConfig

    online = ToxicityConfig(backend="detoxify")  # no model_path: Detoxify downloads its 'original' weights
    assert (online.model_path, online.detoxify_model, online.base_model_path) == (None, "original", None)
    settings = ToxicityConfig(backend="detoxify", model_path=detox["hub"], base_model_path=detox["base"])
    tox = make_scorer(settings)
    assert isinstance(tox, DetoxifyScorer) and tox.version.endswith(":toxicity")  # label 'toxic' = 'toxicity'
    assert tox.score(TEXTS[:1]) == DetoxifyScorer(detox["hub"], base_model=detox["base"]).score(TEXTS[:1])
