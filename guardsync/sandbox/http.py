"""The HTTPS plumbing both sandbox servers share: TLS, threads, counting, faults, latency.

A server here is a WSGI app served by cheroot on 127.0.0.1 with a certificate
signed by a CA made at start (trustme), so clients verify TLS exactly as in
production: they are pointed at `ca_file` (REQUESTS_CA_BUNDLE), never told to skip.

cheroot rather than werkzeug's development server: werkzeug answers every request
with `Connection: close`, so each request paid a TLS handshake (~5 ms of CPU on each
side) and the sandbox, not guardsync, set the pace of a benchmark. cheroot keeps
connections alive (one handshake per client connection, as with the real APIs),
serves them from a pool of threads, and parks idle connections in a selector.
"""

from __future__ import annotations

import errno
import io
import logging
import re
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import trustme
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from werkzeug.wrappers import Request, Response

log = logging.getLogger(__name__)

WORKER_THREADS = 48  # requests served at once (each may sleep `latency`); more wait in a queue
KEEP_ALIVE_CONNECTIONS = 256  # idle connections kept open (cheroot's default of 10 is too few)
IDLE_TIMEOUT = 30  # seconds a connection may sit idle (or a request dribble in) before it is closed
SOCKET_KEY = "guardsync.sandbox.socket"  # environ key: the client's socket, for the `reset` fault
ARRIVED_KEY = "guardsync.sandbox.arrived"  # environ key: when the request reached the server


class SandboxCA:
    """One CA for every sandbox server of a process; writes its PEM once."""

    def __init__(self, directory: Path | None = None):
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.directory = Path(directory or tempfile.mkdtemp(prefix="guardsync-ca-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.directory / "sandbox-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        # The server's key and chain, for servers that load them from files (cheroot does).
        self.server_pem = self.directory / "sandbox-server.pem"
        self.cert.private_key_and_cert_chain_pem.write_to_path(str(self.server_pem))

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
    `skip` serves that many matching requests normally first (a fault in mid-stage).
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
    skip: int = 0

    def matches(self, request: Request) -> bool:
        return (self.method in ("*", request.method)) and re.search(self.path_re, request.full_path) is not None


class _Gateway(wsgi.Gateway_10):
    """WSGI 1.0, plus the client's socket in the environ (the `reset` fault shuts it down),
    and each answer sent in one write.

    cheroot writes the status and headers, each body chunk and the chunked terminator
    separately, flushing each to the socket: three TLS records for one small JSON answer,
    and a client that wakes for each. A real API's answer arrives whole; so does this one:
    the body gets a Content-Length (no chunking) and everything goes out in one write.
    """

    def get_environ(self):
        environ = super().get_environ()
        environ[SOCKET_KEY] = self.req.conn.socket
        environ[ARRIVED_KEY] = getattr(self.req.conn, "arrived", None)
        return environ

    def start_response(self, status, headers, exc_info=None):
        self._status, self._headers, self._exc_info = status, headers, exc_info
        return self._late_write

    def _late_write(self, chunk):
        raise RuntimeError("the sandbox's apps return their body; they do not call write()")

    def respond(self):
        self._status = None
        answer = self.req.server.wsgi_app(self.env, self.start_response)
        try:
            body = b"".join(answer)
        finally:
            if hasattr(answer, "close"):
                answer.close()
        headers = list(self._headers)
        if not any(name.lower() == "content-length" for name, _ in headers) and self._status[:3] not in ("204", "304"):
            headers.append(("Content-Length", str(len(body))))
        socket_file = self.req.conn.wfile
        self.req.conn.wfile = collected = io.BytesIO()  # stands in for the socket while the answer is put together
        try:
            super().start_response(self._status, headers, self._exc_info)
            if body:
                self.write(body)
            self.req.ensure_headers_sent()
        finally:
            self.req.conn.wfile = socket_file
        socket_file.write(collected.getvalue())


class _Server(wsgi.Server):
    keep_alive_conn_limit = KEEP_ALIVE_CONNECTIONS

    def process_conn(self, conn):
        # A request has arrived on this connection (the selector saw it readable): the latency
        # window opens now, so the sandbox's own queueing and parsing count toward it too.
        conn.arrived = time.monotonic()
        super().process_conn(conn)

    def error_log(self, msg="", level=logging.INFO, traceback=False):
        # cheroot writes to stderr; the sandbox's noise (a client that hung up) belongs in a debug log.
        log.debug("sandbox server: %s", msg, exc_info=traceback)


class SandboxServer:
    """Serve `app` over HTTPS on loopback in a daemon thread, with counting and faults."""

    def __init__(self, app: Callable, ca: SandboxCA, latency: float = 0.0):
        self.app = app
        self.ca = ca
        self.latency = latency  # seconds every request takes at least, as a far API would (see _wsgi)
        self.requests: Counter[str] = Counter()  # "METHOD /path-pattern" -> count
        self.statuses: Counter[tuple[str, int]] = Counter()  # ("METHOD /path-pattern", HTTP status) -> count
        self.faults: list[Fault] = []
        self.in_flight = 0  # requests being served now, and the most at once since reset_counts
        self.most_in_flight = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "SandboxServer":
        server = _Server(("127.0.0.1", 0), self._wsgi, numthreads=WORKER_THREADS, timeout=IDLE_TIMEOUT,
                         shutdown_timeout=2, request_queue_size=128)
        server.gateway = _Gateway
        server.ssl_adapter = BuiltinSSLAdapter(str(self.ca.server_pem), str(self.ca.server_pem))
        server.ssl_adapter.context = self.ca.server_context()
        # prepare() binds the socket (the port is known from then on) and starts the workers. It runs in
        # the daemon thread so the workers are daemons too: a process that forgets stop() still exits.
        ready, failure = threading.Event(), []

        def run() -> None:
            try:
                server.prepare()
            except BaseException as exc:  # handed to start(), which raises it
                failure.append(exc)
                return
            finally:
                ready.set()
            server.serve()

        self._thread = threading.Thread(target=run, name=f"sandbox-{type(self).__name__}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        self._server = server
        return self

    def stop(self) -> None:
        if self._server:
            self._server.stop()
            if self._thread:
                self._thread.join(timeout=5)
            self._server, self._thread = None, None

    @property
    def base_url(self) -> str:
        assert self._server, "server not started"
        return f"https://127.0.0.1:{self._server.bind_addr[1]}"

    # -- faults and counts ---------------------------------------------------
    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def answered(self, status: int, method: str | None = None) -> int:
        """Requests answered with `status` (409, 404, ...), of one method or all."""
        return sum(n for (key, code), n in self.statuses.items()
                   if code == status and (method is None or key.startswith(method + " ")))

    def total(self, method: str | None = None) -> int:
        return sum(n for key, n in self.requests.items() if method is None or key.startswith(method + " "))

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.statuses.clear()
            self.most_in_flight = self.in_flight

    def endpoint_of(self, request: Request) -> str:
        """The key requests are counted under; subclasses collapse ids into patterns."""
        return f"{request.method} {request.path}"

    def _take_fault(self, request: Request) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.matches(request):
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.times -= 1
                    return fault
        return None

    def _wsgi(self, environ, start_response) -> Iterable[bytes]:
        """Count, serve (or answer a fault), and answer no sooner than `latency` after the request came in.

        The latency is the far API's whole service time (round trip and its own work), from
        the moment the request reached the server: the sandbox's own queueing, parsing and
        processing count toward it and only the rest is slept, so a slow emulator does not
        add its CPU time to every request a client makes.
        """
        arrived = environ.get(ARRIVED_KEY) or time.monotonic()
        request = Request(environ)
        endpoint = self.endpoint_of(request)
        with self._lock:
            self.requests[endpoint] += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

        def counted_start_response(status, headers, exc_info=None):
            with self._lock:
                self.statuses[(endpoint, int(status[:3]))] += 1
            return start_response(status, headers, exc_info)

        try:
            fault = self._take_fault(request)
            if fault is None:
                answer = self.app(environ, counted_start_response)
            else:
                answer = self._fault(fault, environ, counted_start_response)
            if self.latency:  # nothing is sent until the server iterates the answer: the wait holds it back
                time.sleep(max(0.0, arrived + self.latency - time.monotonic()))
            return answer
        finally:
            with self._lock:
                self.in_flight -= 1

    def _fault(self, fault: Fault, environ, start_response) -> Iterable[bytes]:
        if fault.after_serving:
            # Apply the request for real, then lose the answer.
            list(self.app(environ, lambda *a, **k: None))
        if fault.delay:
            time.sleep(fault.delay)
        if fault.reset:  # drop the connection under the client's feet
            connection = environ.get(SOCKET_KEY)
            if connection is not None:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            # An errno cheroot recognises: it closes the connection without a word.
            raise ConnectionResetError(errno.ECONNRESET, "sandbox fault: connection reset")
        response = Response(fault.body, status=fault.status, headers=fault.headers, content_type="application/json")
        return response(environ, start_response)
