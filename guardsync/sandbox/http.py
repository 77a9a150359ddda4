"""The HTTPS plumbing both sandbox servers share: TLS, threads, counting, faults, latency.

A server here is a WSGI app served by werkzeug on 127.0.0.1 with a certificate
signed by a CA made at start (trustme), so clients verify TLS exactly as in
production: they are pointed at `ca_file` (REQUESTS_CA_BUNDLE), never told to skip.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import trustme
import socket

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response


class SandboxCA:
    """One CA for every sandbox server of a process; writes its PEM once."""

    def __init__(self, directory: Path | None = None):
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.directory = Path(directory or tempfile.mkdtemp(prefix="guardsync-ca-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.directory / "sandbox-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self):
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.cert.configure_cert(context)
        return context


@dataclass
class Fault:
    """Answer `status` (with `headers` and `body`) instead of serving, `times` times.

    `after_serving=True` serves the request first and then answers the fault: the
    write happened but the client never hears it (a timeout after apply).
    `delay` sleeps before answering (timeouts); `reset` closes the connection.
    """

    method: str
    path_re: str
    status: int = 503
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    delay: float = 0.0
    after_serving: bool = False
    reset: bool = False

    def matches(self, request: Request) -> bool:
        return (self.method in ("*", request.method)) and re.search(self.path_re, request.full_path) is not None


class _Handler(WSGIRequestHandler):
    """Keep-alive (one TLS handshake per client connection, as with the real APIs) and no Nagle
    delay: werkzeug writes headers and body apart, and Nagle would hold the body ~10 ms."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True


class SandboxServer:
    """Serve `app` over HTTPS on loopback in a daemon thread, with counting and faults."""

    def __init__(self, app: Callable, ca: SandboxCA, latency: float = 0.0):
        self.app = app
        self.ca = ca
        self.latency = latency  # seconds added to every request, as a far API would
        self.requests: Counter[str] = Counter()  # "METHOD /path-pattern" -> count
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server: BaseWSGIServer | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "SandboxServer":
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on the operator's terminal
        self._server = make_server(
            "127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_Handler,
            ssl_context=self.ca.server_context(),
        )
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server, "server not started"
        return f"https://127.0.0.1:{self._server.server_port}"

    # -- faults and counts ---------------------------------------------------
    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def total(self, method: str | None = None) -> int:
        return sum(n for key, n in self.requests.items() if method is None or key.startswith(method + " "))

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    def endpoint_of(self, request: Request) -> str:
        """The key requests are counted under; subclasses collapse ids into patterns."""
        return f"{request.method} {request.path}"

    def _take_fault(self, request: Request) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.matches(request):
                    fault.times -= 1
                    return fault
        return None

    def _wsgi(self, environ, start_response) -> Iterable[bytes]:
        request = Request(environ)
        with self._lock:
            self.requests[self.endpoint_of(request)] += 1
        if self.latency:
            time.sleep(self.latency)
        fault = self._take_fault(request)
        if fault is None:
            return self.app(environ, start_response)
        if fault.after_serving:
            # Apply the request for real, then lose the answer.
            list(self.app(environ, lambda *a, **k: None))
        if fault.delay:
            time.sleep(fault.delay)
        if fault.reset:  # drop the connection under the client's feet
            connection = environ.get("werkzeug.socket")
            if connection is not None:
                connection.shutdown(socket.SHUT_RDWR)
            raise ConnectionResetError("sandbox fault: connection reset")
        response = Response(fault.body, status=fault.status, headers=fault.headers, content_type="application/json")
        return response(environ, start_response)
