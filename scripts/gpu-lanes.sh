# Shared by the GPU scripts that run timed lanes in the background (gpu-vllm.sh, gpu-qlora.sh); source it after
# setting $work. The device machine is given back 30 s after a call ends, so lanes run detached and a caller
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
