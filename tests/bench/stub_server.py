"""A stand-in server process for the launcher tests (no engine may run in tests).

    python stub_server.py --port P [--child] [--stubborn] [--die]

Serves `/v1/models` and a streaming `/v1/completions` on 127.0.0.1 with the standard library.
`--child` starts a sleeping child process (a process tree, like an engine's workers);
`--stubborn` ignores SIGINT and SIGTERM (teardown must escalate to SIGKILL); `--die` exits at
once with code 3 (a launch that fails).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
    args = parser.parse_args()
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
