"""What recording one model state costs, and what recording its runs concurrently would save (issue 22's floor).

On the H200 a Study B state took 6.8 s with vLLM and 9.9 s with the harness engine, and the runs' timestamps show
about 2 s of it is writing the state's 10 runs to MLflow, one after the other (benchmarks/RESULTS.md, "Rerun with
served adapters"). This measures that part alone, off the GPU, with the harness's own `Tracker` against a real MLflow
server (sqlite backend, proxied artifacts, as scripts/gpu-study-b.sh starts it): a state's 4 generation runs (the
600-prompt harmful mix, 50 + 100 XSTest, 100 task prompts, replies of about 1 KB) and 6 evaluation runs (a
per-prompt table each), first one after the other as the evaluator writes them, then with the 4 generation runs and
the 6 evaluation runs each written by a pool of threads. It also counts the REST calls the server saw per run.

    python benchmarks/recording.py --states 5

It prints seconds per state for both and their ratio, measured in one process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.judges.vllm_server import free_port  # noqa: E402
from tracking import RunHandle, Tracker  # noqa: E402
from tracking.schema import Kind  # noqa: E402

BENCHMARKS = {"harmful_mix": 600, "xstest_unsafe": 50, "xstest_safe": 100, "wikihow": 100}
EVALUATIONS = ["harmful_mix", "xstest_unsafe", "xstest_safe", "wikihow", "wikihow", "wikihow"]


def start_server(folder: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = folder / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return server, uri, log
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the MLflow server did not start; see {log}")


def record_generation(tracker: Tracker, parent: RunHandle, benchmark: str, state: int) -> str:
    prompts = [f"prompt {i} of {benchmark}" * 8 for i in range(BENCHMARKS[benchmark])]
    replies = ["a reply of about a kilobyte " * 36 for _ in prompts]
    config = {"state": state, "benchmark": benchmark, "decoding": {"temperature": 0.0, "max_new_tokens": 256}}
    with tracker.run(Kind.GENERATION, f"{benchmark}-generations-T0", {"benchmark": benchmark}, parent=parent,
                     config=config, config_hash=f"g{state}-{benchmark}-{time.monotonic_ns()}") as run:
        run.log_table({"prompt": prompts, "response": replies}, "generations.json")
        run.log_metrics({"n_prompts": len(prompts)})
        return run.run_id


def record_evaluation(tracker: Tracker, parent: RunHandle, benchmark: str, state: int, index: int) -> None:
    rows = BENCHMARKS[benchmark]
    config = {"state": state, "benchmark": benchmark, "judge": "keyword", "index": index}
    with tracker.run(Kind.EVALUATION, f"{benchmark}-keyword-T0", {"benchmark": benchmark}, parent=parent,
                     config=config, config_hash=f"e{state}-{index}-{time.monotonic_ns()}") as run:
        run.log_metrics({"asr": 0.5, "n_prompts": rows})
        run.log_table({"harmful": [i % 2 == 0 for i in range(rows)], "reason": ["refusal phrase"] * rows},
                      "per_prompt.json")


def one_state(tracker: Tracker, parent: RunHandle, state: int, pool: ThreadPoolExecutor | None) -> None:
    if pool is None:
        for benchmark in BENCHMARKS:
            record_generation(tracker, parent, benchmark, state)
        for index, benchmark in enumerate(EVALUATIONS):
            record_evaluation(tracker, parent, benchmark, state, index)
        return
    list(pool.map(lambda benchmark: record_generation(tracker, parent, benchmark, state), BENCHMARKS))
    list(pool.map(lambda item: record_evaluation(tracker, parent, item[1], state, item[0]), enumerate(EVALUATIONS)))


def requests_seen(log: Path) -> int:
    return sum(" HTTP/1.1\" " in line for line in log.read_text(errors="replace").splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server, uri, log = start_server(Path(folder))
        try:
            tracker = Tracker("recording-benchmark", uri)
            with tracker.run(Kind.CHECKPOINT, "state", {}) as parent:
                one_state(tracker, parent, -1, None)  # warm-up: connections, the experiment, provenance
                results = {}
                for label, threads in (("one after the other", 0), (f"{args.threads} threads", args.threads)):
                    before = requests_seen(log)
                    pool = ThreadPoolExecutor(threads) if threads else None
                    start = time.perf_counter()
                    for state in range(args.states):
                        one_state(tracker, parent, state, pool)
                    seconds = (time.perf_counter() - start) / args.states
                    if pool is not None:
                        pool.shutdown()
                    time.sleep(1.0)  # the server's access log is written after the reply
                    calls = (requests_seen(log) - before) / (args.states * (len(BENCHMARKS) + len(EVALUATIONS)))
                    results[label] = seconds
                    print(f"{label}: {seconds:.2f} s per state (10 runs), {calls:.1f} REST calls per run", flush=True)
            first, second = results.values()
            print(f"ratio: {first / second:.2f}x faster with threads ({os.cpu_count()} CPUs, server with 2 workers)")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
