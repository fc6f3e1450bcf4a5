"""Stands in for `python -m vllm.entrypoints.openai.api_server` where vLLM cannot run (CPU, CI): it takes the
arguments the harness gives vLLM's server (an argument it does not know is an error, as in vLLM) and speaks the part
of its protocol the harness uses: `GET /health`, `POST /v1/chat/completions`. Every request body is appended to the
JSON-lines file $STAND_IN_REQUESTS; the reply is $STAND_IN_ANSWER. `--exit-at-start` dies at once, as a server that
cannot load its model does."""

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
args = parser.parse_args()
if args.exit_at_start:
    print(f"ValueError: cannot load {args.model}: out of memory", flush=True)
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
