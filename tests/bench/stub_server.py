"""A stand-in server process for the launcher tests (no engine may run in tests).

    python stub_server.py --port P [--child] [--stubborn] [--die]
                          [--fail-every N] [--token-delay S] [--burn S]

Serves `/v1/models` and a streaming `/v1/completions` on 127.0.0.1 with the standard library.
`--child` starts a sleeping child process (a process tree, like an engine's workers);
`--stubborn` ignores SIGINT and SIGTERM (teardown must escalate to SIGKILL); `--die` exits at
once with code 3 (a launch that fails); `--fail-every N` answers HTTP 500 to every N-th
completion request (by arrival, the launcher's first-token probe being the first);
`--token-delay S` sleeps S seconds per output token; `--burn S` spends S seconds of CPU per
completion request (so CPU accounting and latency ratios have a known answer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Knobs:
    fail_every = 0
    token_delay = 0.0
    burn = 0.0
    arrivals = 0
    lock = threading.Lock()


def burn_cpu(seconds: float) -> None:
    """Spin until this thread has used `seconds` of CPU."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"data": [{"id": "tiny-moe"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        request = json.loads(self.rfile.read(length))
        n = int(request.get("max_tokens", 1))
        with Knobs.lock:
            Knobs.arrivals += 1
            arrival = Knobs.arrivals
        if Knobs.fail_every and arrival % Knobs.fail_every == 0:
            body = json.dumps({"error": {"message": f"injected failure {arrival}"}}).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        burn_cpu(Knobs.burn)
        time.sleep(Knobs.token_delay * n)
        usage = {
            "prompt_tokens": len(str(request.get("prompt", "")).split()),
            "completion_tokens": n,
        }
        if not request.get("stream"):
            body = json.dumps({"choices": [{"index": 0, "text": "t" * n}], "usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(n):
            chunk = {"choices": [{"index": 0, "text": f"t{i}"}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if (request.get("stream_options") or {}).get("include_usage"):
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--stubborn", action="store_true")
    parser.add_argument("--die", action="store_true")
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--burn", type=float, default=0.0)
    args = parser.parse_args()
    Knobs.fail_every, Knobs.token_delay, Knobs.burn = args.fail_every, args.token_delay, args.burn
    if args.die:
        print("stub: failing on purpose", flush=True)
        sys.exit(3)
    if args.stubborn:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.child:
        code = "import signal, time\n"
        if args.stubborn:
            code += "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        code += "time.sleep(600)\n"
        subprocess.Popen([sys.executable, "-c", code])
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"stub: serving on {args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
