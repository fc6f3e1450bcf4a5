"""Stands in for `python -m vllm.entrypoints.openai.api_server` where vLLM cannot run (CPU, CI): it takes the
arguments the harness gives vLLM's server (an argument it does not know is an error, as in vLLM) and speaks the part
of its protocol the harness uses: `GET /health`, `POST /v1/chat/completions`. Every request body is appended to the
JSON-lines file $STAND_IN_REQUESTS; the reply is $STAND_IN_ANSWER. `--exit-at-start` dies at once, as a server that
cannot load its model does. `--profiling-race-once MARKER` dies the way vLLM 0.26 did on the H200 when a neighbour
freed GPU memory during its memory profiling (the lines of benchmarks/h200-one/judge-server.log: the engine
process's assertion, then the API server's generic error), once: it leaves MARKER behind and serves on the next
start. `--root-cause-above` dies with those two layers around another cause."""

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
for flag in ("--model", "--served-model-name", "--host", "--port", "--dtype", "--seed", "--gpu-memory-utilization",
             "--generation-config", "--max-logprobs", "--revision", "--quantization"):
    parser.add_argument(flag)
parser.add_argument("--exit-at-start", action="store_true")
parser.add_argument("--profiling-race-once")
parser.add_argument("--root-cause-above", action="store_true")
args = parser.parse_args()
if args.exit_at_start:
    print(f"ValueError: cannot load {args.model}: out of memory", flush=True)
    sys.exit(1)
GENERIC = ("(APIServer pid=13079) RuntimeError: Engine core initialization failed. See root cause above. "
           "Failed core proc(s): {}")
if args.profiling_race_once and not os.path.exists(args.profiling_race_once):
    open(args.profiling_race_once, "w").close()
    print("(EngineCore pid=13318) ERROR 12-01 06:43:13 [core.py:1330] AssertionError: Error in memory profiling. "
          "Initial free memory 131.21 GiB, current free memory 131.22 GiB. This happens when other processes sharing "
          "the same container release GPU memory while vLLM is profiling during initialization.", flush=True)
    print(GENERIC, flush=True)
    sys.exit(1)
if args.root_cause_above:
    print("(EngineCore pid=13318) ERROR 12-01 06:43:13 [core.py:1330] Traceback (most recent call last):", flush=True)
    print("(EngineCore pid=13318) ValueError: To serve at least one request with the models's max seq len (32768), "
          "(0.88 GiB KV cache) is needed, which is larger than the available KV cache memory (0.10 GiB).", flush=True)
    print(GENERIC, flush=True)
    sys.exit(1)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *_):
        pass

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(os.environ["STAND_IN_REQUESTS"], "a") as log:
            log.write(json.dumps(request) + "\n")
        if request.get("model") != args.served_model_name:
            self.reply(404, {"error": {"message": f"The model `{request.get('model')}` does not exist."}})
            return
        message = {"role": "assistant", "content": os.environ.get("STAND_IN_ANSWER", "1")}
        self.reply(200, {"object": "chat.completion", "model": args.served_model_name,
                         "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]})


print(f"serving {args.served_model_name} ({args.model}) on {args.host}:{args.port}", flush=True)
ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()
