"""tests/readiness.py: a server that accepts a connection and answers slowly is "not ready yet", not a failure."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from readiness import NotReady, first_answer


class _SlowThenReady(http.server.BaseHTTPRequestHandler):
    """Like a gunicorn master whose workers are still loading the model: the connection is accepted, and the answer
    comes later than the probe waits, for the first `slow` requests."""

    slow = 2
    seen = 0

    def do_GET(self):
        type(self).seen += 1
        if type(self).seen <= self.slow:
            time.sleep(1.0)
        body = b'{"status": "healthy"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_server():
    _SlowThenReady.seen = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowThenReady)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/ping"
    finally:
        server.shutdown()
        server.server_close()


def test_a_slow_answer_is_not_ready_yet(slow_server):
    status, body, _ = first_answer(slow_server, timeout=60, probe_timeout=0.3, interval=0.05)
    assert (status, body) == (200, b'{"status": "healthy"}')
    assert _SlowThenReady.seen > _SlowThenReady.slow  # the slow answers were waited past, not taken as failures


def test_a_dead_server_ends_the_wait_with_its_log():
    with pytest.raises(NotReady, match="(?s)exited before answering.*server log here"):
        first_answer("http://127.0.0.1:9/ping", timeout=60, probe_timeout=0.3, alive=lambda: False,
                     logs=lambda: "server log here")
