"""A generative judge's model served by vLLM (issue 22): a local judge that writes its answer (StrongREJECT's
reasoning, the fulfilment judge) configured with `engine: vllm` is asked through vLLM's OpenAI-compatible server
instead of HF `generate`.

Why judges keep vLLM when the evaluated model's generation does not: a judge is one base model with no adapter, the
case where vLLM measured fastest (2.3-3.0x plain `generate` on the 8B architecture, benchmarks/RESULTS.md), while
the states under study are adapters, which vLLM served no faster than the harness's own path (issue 22 removed
that engine: harness/generation/engines.py).

Why a server in its own process, and not `vllm.LLM` in the harness's: vLLM's process-wide state (its distributed
group, compile cache, CUDA graphs) stays out of the evaluation's process, a child process is what vLLM itself runs
in production, and the harness already asks OpenAI-compatible servers well (`registry.ChatEndpoint`: concurrency,
retries, log-probabilities). The server takes its own share of the GPU (`HARNESS_VLLM_JUDGE_GPU_MEMORY`, default
0.3), so the model under study and the judge need not leave the GPU in turn.

Judges that read label probabilities (llm, harmbench, llamaguard, wildguard, trained) stay on their local HF model:
they run one forward pass over the prompt and generate nothing, the part of the work where vLLM is not faster.
A served judge's identity ends in "@vllm" (`evals.benchmarks.judge_id`), so its verdicts are never mixed with the
same judge's HF ones.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.errors import HarnessError

GPU_MEMORY_VARIABLE = "HARNESS_VLLM_JUDGE_GPU_MEMORY"
"""Environment variable: the share of the GPU's memory the judge's vLLM server may take."""
DEFAULT_GPU_MEMORY_UTILIZATION = 0.3
STARTUP_TIMEOUT_S = 1200.0
"""An 8B judge's server starts in 1-3 minutes on an H200 (weights, compilation, CUDA graphs); a cold download longer."""


PROFILING_RACE = "Error in memory profiling"
"""How vLLM 0.26's start-up assertion begins when another process on the GPU frees memory while vLLM measures its
own (seen on the H200: benchmarks/h200-one/judge-server.log). Not a lack of memory: a start once the GPU is quiet
gets past it, so the server is tried once more."""
START_ATTEMPTS = 2
"""A start that dies of vLLM's profiling race (`PROFILING_RACE`: a neighbour freed GPU memory while the
server measured, as several evaluations or sweep workers on one GPU do) is tried once more."""
RETRY_PAUSE_S = 5.0
GENERIC_FAILURES = ("Engine core initialization failed",)
"""vLLM's last words when its engine process died: the root cause is logged above them."""
LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s*(?:ERROR \S+ \S+ \[[^\]]+\]\s*)?")
"""vLLM's per-process prefix on log lines: "(EngineCore pid=13318) ERROR 12-01 06:43:13 [core.py:1330] "."""


def vllm_unavailable() -> str | None:
    """Why a judge cannot be served by vLLM here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "there is no CUDA device"
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install -e '.[vllm]')"
    return None


def gpu_memory_share(variable: str, default: float, what: str = "vLLM") -> float:
    """A share of the GPU's memory from environment variable `variable` (in (0, 1]), else `default`; a bad value
    is one line naming the variable."""
    raw = os.environ.get(variable)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise HarnessError(f"{variable}={raw!r}: give the share of GPU memory {what} may use, in (0, 1]")
    return value


def root_cause(log: str) -> str:
    """The line of a failed start's log that says why: the last exception line (`SomethingError: ...`) that is not
    vLLM's generic "see root cause above", without vLLM's process prefix; else the last line."""
    lines = [LOG_PREFIX.sub("", line).strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)
              and not any(generic in line for generic in GENERIC_FAILURES)]
    chosen = causes[-1] if causes else (lines[-1] if lines else "nothing logged")
    return chosen[:240]


def judge_gpu_memory() -> float:
    return gpu_memory_share(GPU_MEMORY_VARIABLE, DEFAULT_GPU_MEMORY_UTILIZATION, "the judge's vLLM server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_arguments(location: str, served_name: str, port: int, *, gpu_memory: float, quantize_4bit: bool = False,
                     revision: str | None = None) -> list[str]:
    """vLLM's OpenAI-compatible server's arguments for one judge model. `--generation-config vllm`: the checkpoint's
    own sampling defaults (a repetition penalty, top-k) must not change a judge asked at temperature 0, as the HF
    path switches them off too; `--max-logprobs 20`: what `ChatEndpoint` asks for to read labels."""
    arguments = ["--model", location, "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
                 "--dtype", "bfloat16", "--seed", "0", "--gpu-memory-utilization", f"{gpu_memory:g}",
                 "--generation-config", "vllm", "--max-logprobs", "20"]
    if revision:
        arguments += ["--revision", revision]
    if quantize_4bit:
        arguments += ["--quantization", "bitsandbytes"]
    return arguments


VLLM_SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


class JudgeServer:
    """One judge model behind vLLM's OpenAI-compatible server, a child process of this one: `start()` waits until
    `/health` answers, `base_url` is what `ChatEndpoint` asks, `close()` stops it (also at interpreter exit). Its
    output goes to `log_path`; a server that dies or never answers is a one-line error naming that log.
    `program` replaces `python -m vllm.entrypoints.openai.api_server` (the tests run a stand-in there)."""

    def __init__(self, model: str, *, log_path: Path, quantize_4bit: bool = False, program: list[str] | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT_S):
        from harness.models import resolve_model

        source = resolve_model(model)
        self.served_name = model
        self.port = free_port()
        self.log_path = Path(log_path)
        self.command = [*(program or VLLM_SERVER), *server_arguments(
            source.location, model, self.port, gpu_memory=judge_gpu_memory(), quantize_4bit=quantize_4bit,
            revision=source.revision)]
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "JudgeServer":
        """Launch the server and wait for `/health`. A start that dies of vLLM's profiling race is tried once more
        (START_ATTEMPTS); any other death is one line with its root cause and the log's path."""
        atexit.register(self.close)
        # vLLM's start (weights, torch.compile, CUDA graphs) took 110 s for a 1.5B judge on an H200: say so, or the
        # study's progress line looks stuck.
        print(f"starting vLLM's server for the judge model {self.served_name!r} (a minute or two; log: "
              f"{self.log_path})", file=sys.stderr, flush=True)
        started = time.monotonic()
        for attempt in range(1, START_ATTEMPTS + 1):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            if self.launch_and_wait():
                print(f"the judge server for {self.served_name!r} is ready after {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)
                return self
            this_start = self.log_text(offset)
            if attempt < START_ATTEMPTS and PROFILING_RACE in this_start:
                print(f"the judge server for {self.served_name!r} failed vLLM's memory profiling (another process "
                      f"freed GPU memory while it measured); starting it again (log: {self.log_path})",
                      file=sys.stderr, flush=True)
                time.sleep(RETRY_PAUSE_S)
                continue
            raise HarnessError(f"the judge server for {self.served_name!r} stopped at start (exit "
                               f"{self.returncode}): {root_cause(this_start)} (log: {self.log_path})")
        raise AssertionError("unreachable")

    def launch_and_wait(self) -> bool:
        """True once the server answers `/health`; False if it died first (its exit code in `returncode`). A server
        that neither answers nor dies within the timeout is stopped and a one-line error."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0"),
               "VLLM_NO_USAGE_STATS": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.returncode = self.process.returncode
                self.process = None
                return False
            if self.healthy():
                return True
            time.sleep(1.0)
        self.close()
        raise HarnessError(f"the judge server for {self.served_name!r} did not answer within "
                           f"{self.startup_timeout:.0f} s (log: {self.log_path})")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def log_text(self, offset: int = 0) -> str:
        """The server log from byte `offset` on (what one start wrote)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server and everything it started (its process group): SIGTERM, then SIGKILL after 30 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass


_running: dict[tuple, JudgeServer] = {}


def shared_server(model: str, *, log_dir: Path, quantize_4bit: bool = False,
                  program: list[str] | None = None) -> JudgeServer:
    """The process's server for a judge model, started on first use and kept for the process's life (stopped at
    exit): a sweep's trials, each with its own runner, ask the same server rather than wait for a new one each."""
    key = (model, quantize_4bit, tuple(program or ()))
    server = _running.get(key)
    if server is None or server.process is None or server.process.poll() is not None:
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in model)
        server = JudgeServer(model, quantize_4bit=quantize_4bit, log_path=Path(log_dir) / f"judge-server-{slug}.log",
                             program=program).start()
        _running[key] = server
    return server
