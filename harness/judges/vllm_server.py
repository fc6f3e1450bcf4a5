"""A generative judge's model served by vLLM (issue 22): when the evaluation generates with vLLM, a local judge that
writes its answer (StrongREJECT's reasoning, the fulfilment judge) is asked through vLLM's OpenAI-compatible server
instead of HF `generate`.

Why a server in its own process, and not a second `vllm.LLM` beside the evaluation's engine: two engines in one
process share vLLM's process-wide state (its distributed group, compile cache, CUDA graphs), while a child process
is what vLLM itself runs in production, and the harness already asks OpenAI-compatible servers well
(`registry.ChatEndpoint`: concurrency, retries, log-probabilities). The server takes its own share of the GPU
(`HARNESS_VLLM_JUDGE_GPU_MEMORY`, default 0.3) beside the evaluation's engine (`HARNESS_VLLM_GPU_MEMORY`, 0.5),
so the model under study and the judge need not leave the GPU in turn.

Judges that read label probabilities (llm, harmbench, llamaguard, wildguard, trained) stay on their local HF model:
they run one forward pass over the prompt and generate nothing, the part of the work where vLLM is not faster.
A served judge's identity ends in "@vllm" (`evals.benchmarks.judge_id`), so its verdicts are never mixed with the
same judge's HF ones.
"""

from __future__ import annotations

import atexit
import os
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


def judge_gpu_memory() -> float:
    from harness.generation.vllm_engine import gpu_memory_share

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

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "JudgeServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0"),
               "VLLM_NO_USAGE_STATS": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.close)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(f"the judge server for {self.served_name!r} stopped at start (exit "
                                   f"{self.process.returncode}): {self.last_log_line()} (log: {self.log_path})")
            if self.healthy():
                return self
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

    def last_log_line(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        return lines[-1][:200] if lines else "nothing logged"

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
