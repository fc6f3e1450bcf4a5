"""Toxicity scorers: the Perspective backend against a local server speaking `comments:analyze` (429, 5xx,
caching, rate limit), and the local-classifier backend on a tiny random classifier saved to disk."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.errors import HarnessError
from harness.evals.toxicity import LocalClassifierScorer, PerspectiveScorer, ScoreCache, toxicity_metrics

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
