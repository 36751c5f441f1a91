"""HTTP on 127.0.0.1 only: the demo serves its stickers with it, the tests their good and bad URLs,
the benchmark its images. Never bound to another interface.
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Route = Callable[[str], "tuple[int, str, bytes, float]"]  # path -> (status, content type, body, delay seconds)


class LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The downloader opens many connections at once; the default backlog of 5 makes the kernel drop
    # connection attempts, which then wait a second for a retry.
    request_queue_size = 128


class LoopbackServer:
    """Answers GET requests with `route(path)` on 127.0.0.1:`port` (0: any free port); counts requests."""

    def __init__(self, route: Route, port: int = 0):
        server = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests += 1
                status, ctype, body, delay = route(self.path)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):  # one line per image would drown the progress output
                pass

        try:
            self.httpd = LoopbackHTTPServer(("127.0.0.1", port), Handler)
        except OSError:
            if not port:
                raise
            self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="loopback-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
