#!/usr/bin/env bash
# Screenshots of MLflow's own UI on a study's store, taken by headless Chromium against `mlflow server`:
#   runs.png          the study's runs table (its Dataset and Source columns)
#   loss.png          a fine-tune run's metric charts (train_loss and its format/content split, eval_loss)
#   evaluation.png    an evaluation run's overview: source, git branch and commit, user, its dataset inputs
#   per_prompt.png    the same evaluation's per-prompt table (its per_prompt.json artifact)
#   report.png        the newest `harness figures` report run's artifacts, Fig. 3 open (when the study has one)
#
#   scripts/mlflow-screenshots.sh [STORE_DB] [STUDY] [OUT_DIR]
#
# STORE_DB defaults to mlruns/mlflow.db (made with `make quickstart-plumbing` when there is none: every part of the
# pipeline, validation loss included, which the screenshots show), STUDY to quickstart_plumbing, OUT_DIR to docs/results/mlflow-ui. Needs Debian's chromium (`apt-get install chromium`). The
# server is started on a free local port, read only by the browser, and stopped on exit; each PNG is kept under
# 400 KB (reduced to 256 colours when larger). MLflow 3.17's UI opens in its GenAI view unless its sidebar switch
# says Model training; the URLs say so with `workflowType=machine_learning`, as that switch does.
set -euo pipefail

cd "$(dirname "$0")/.."
STORE=${1:-mlruns/mlflow.db}
STUDY=${2:-quickstart_plumbing}
OUT=${3:-docs/results/mlflow-ui}
PY=${PYTHON:-.venv/bin/python}
MLFLOW=${MLFLOW:-$(dirname "$PY")/mlflow}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$CHROMIUM" ] || { echo "error: no chromium on PATH (apt-get install -y chromium)" >&2; exit 2; }

if [ ! -f "$STORE" ]; then
    [ "$STORE" = mlruns/mlflow.db ] || { echo "error: no tracking store at $STORE" >&2; exit 2; }
    echo "no store yet: making one (make quickstart-plumbing)" >&2
    make quickstart-plumbing
fi
STORE=$(cd "$(dirname "$STORE")" && pwd)/$(basename "$STORE")
mkdir -p "$OUT"

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
LOG=$(mktemp)
PROFILES=$(mktemp -d)  # a fresh browser profile per page: no earlier page's UI state or cache
"$MLFLOW" server --backend-store-uri "sqlite:///$STORE" --host 127.0.0.1 --port "$PORT" --workers 1 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$LOG" "$PROFILES"' EXIT
started=$SECONDS
until curl -sf "$URL/health" >/dev/null; do
    if ! kill -0 "$SERVER" 2>/dev/null || [ $((SECONDS - started)) -gt 300 ]; then
        echo "error: mlflow server did not start; its log:" >&2; tail -20 "$LOG" >&2; exit 1
    fi
    sleep 1
done
echo "mlflow server up on $URL after $((SECONDS - started)) s"

# The runs to show, found through the same REST API the UI reads: the first SFT fine-tune, and the newest
# harmful-prompt evaluation of an SFT model at its last epoch (else of any method, else of the base model).
read -r EXPERIMENT FINETUNE EVALUATION REPORT < <("$PY" - "$URL" "$STUDY" <<'EOF'
import json, sys, urllib.parse, urllib.request

url, study = sys.argv[1:]
def call(endpoint, payload=None):
    if payload is None:
        return json.load(urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}"))
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request))

experiment = call(f"experiments/get-by-name?experiment_name={urllib.parse.quote(study)}")["experiment"]["experiment_id"]
def runs(where):
    return call("runs/search", {"experiment_ids": [experiment], "filter": where, "max_results": 1000,
                                "order_by": ["attributes.start_time ASC"]}).get("runs", [])
def tags(run):
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
finetunes = runs("tags.`harness.kind` = 'finetune' and attributes.status = 'FINISHED'")
finetune = next((run for run in finetunes if tags(run).get("harness.method") == "sft"), finetunes[0] if finetunes else None)
evaluations = runs("tags.`harness.kind` = 'evaluation' and tags.`harness.benchmark` = 'harmful_mix' "
                   "and attributes.status = 'FINISHED'")
def rank(run):
    t = tags(run)
    return (t.get("harness.method") == "sft", int(t.get("harness.epoch", 0)), "judge" in t, run["info"]["start_time"])
evaluation = max(evaluations, key=rank, default=None)
if finetune is None or evaluation is None:
    sys.exit(f"study {study} has no FINISHED finetune or harmful_mix evaluation run")
reports = runs("tags.`harness.kind` = 'report' and tags.`harness.report` = 'figures' and attributes.status = 'FINISHED'")
print(experiment, finetune["info"]["run_id"], evaluation["info"]["run_id"], reports[-1]["info"]["run_id"] if reports else "-")
EOF
)

shoot() {  # shoot NAME URL: one headless screenshot, kept under 400 KB
    local png="$OUT/$1.png" try
    for try in 1 2; do  # a browser that stalls (seen once on a loaded machine) is stopped and tried again
        rm -f "$png"
        # Every compositor stage before the capture: without it the metric charts were caught half drawn.
        timeout 120 "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
            --user-data-dir="$(mktemp -d -p "$PROFILES")" --window-size=1600,1000 --virtual-time-budget=30000 \
            --run-all-compositor-stages-before-draw --screenshot="$png" "$2" >/dev/null 2>&1 || true
        [ -s "$png" ] && break
    done
    [ -s "$png" ] || { echo "error: no screenshot of $2" >&2; exit 1; }
    "$PY" - "$png" <<'EOF'
import os, sys
from PIL import Image

path = sys.argv[1]
if os.path.getsize(path) > 400_000:  # 256 colours keep the UI's text sharp at a fraction of the size
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
EOF
    echo "$png ($(($(stat -c %s "$png") / 1024)) KB): $2"
}

VIEW="workflowType=machine_learning"
shoot runs "$URL/#/experiments/$EXPERIMENT/runs?$VIEW"
shoot loss "$URL/#/experiments/$EXPERIMENT/runs/$FINETUNE/model-metrics?$VIEW"
shoot evaluation "$URL/#/experiments/$EXPERIMENT/runs/$EVALUATION?$VIEW"
shoot per_prompt "$URL/#/experiments/$EXPERIMENT/runs/$EVALUATION/artifacts/per_prompt.json?$VIEW"
if [ "$REPORT" != - ]; then
    shoot report "$URL/#/experiments/$EXPERIMENT/runs/$REPORT/artifacts/fig3_asr.png?$VIEW"
else
    echo "no report run (harness figures --study $STUDY): report.png not taken"
fi
