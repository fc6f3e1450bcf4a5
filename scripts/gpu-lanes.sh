# Shared by the GPU scripts that run timed lanes in the background (gpu-vllm.sh, gpu-qlora.sh, gpu-one-h200.sh,
# gpu-vllm-one.sh); source it from the repository root after setting $work. The device machine is given back 30 s after a call ends, so lanes run detached and a caller
# follows them with `follow_lanes` in calls of at most 10 minutes, then packs everything with `pack_lanes`.

timed() {  # timed NAME COMMAND...: its log in $work/NAME.log, its wall-clock seconds appended to $work/timings.txt
    local name=$1 start rc=0; shift
    start=$(date +%s%N)
    "$@" > "$work/$name.log" 2>&1 || rc=$?
    echo "$name rc=$rc seconds=$(( ($(date +%s%N) - start) / 1000000 ))e-3" >> "$work/timings.txt"
    return $rc
}
export -f timed

follow_lanes() {  # follow_lanes SECONDS DONE_FILE...: wait until every DONE_FILE exists (or SECONDS pass), then report
    local end=$(( $(date +%s) + $1 )) file missing; shift
    while [ "$(date +%s)" -lt "$end" ]; do
        missing=0; for file in "$@"; do [ -f "$work/$file" ] || missing=1; done
        [ "$missing" = 0 ] && break
        sleep 10
    done
    cat "$work/timings.txt"
    for f in "$work"/*.log; do echo "== $f"; tail -c 600 "$f" | tr '\r' '\n' | tail -n 4; done
    nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader || true
}

pack_lanes() {  # results (JSON), timings, logs, configs and a consistent copy of the MLflow store into $OUT
    mkdir -p "$OUT"
    cp "$work"/timings.txt "$work"/*.json "$OUT"/ 2>/dev/null || true
    python3 -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" \
        "$work/mlflow.db" "$work/mlflow-copy.db"
    tar czf "$OUT/store-and-logs.tgz" -C "$work" mlflow-copy.db $(cd "$work" && ls *.log *.yaml)
    ls -la "$OUT"
}

gpu_environment() {  # the environment every harness process of a GPU script runs in (the newer scripts use it)
    export PYTHONPATH=/root/site:$PWD HARNESS_DATA_DIR=$work/shared/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0
    export VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=5
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
}

vllm_setup() {  # vllm_setup MODEL [MODULE...]: after gpu-study-b.sh setup, vLLM's newer typing_extensions beside the
    # image's (VLLM.md), then the versions of vllm, torch and MODULEs, and where MODEL resolves (converting it once)
    local model=$1 module; shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site \
        /root/stage/out/typing_extensions-*.whl 2>&1 | tail -2
    for module in vllm torch "$@"; do
        python3 -c "import $module; print('$module', $module.__version__)"
    done
    python3 -c "import torch; print(torch.cuda.get_device_name())"
    python3 -c "from harness.models import resolve_model; print(resolve_model('$model').location)"
}

pack_generations() {  # every generations.json of the store's artifacts as $OUT/generations.tgz (a few MB): measurement 3
    # and the per-step comparisons can be recomputed off the GPU if the machine goes back before they ran there
    (cd "$work" && find artifacts -name generations.json -print0 | tar czf "$OUT/generations.tgz" --null -T -) || true
    ls -la "$OUT"
}
