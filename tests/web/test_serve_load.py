"""`difflo serve` under load, on loopback: a burst of connects, clients that go away early, stalled bodies."""
import json
import re
import socket
import struct
import threading
import time

import pytest

from difflo.serve.app import App
from difflo.serve.server import Handler, make_server

GONE = re.compile(r"difflo serve: client 127\.0\.0\.1:\d+ went away \((BrokenPipeError|ConnectionResetError|"
                  r"ConnectionAbortedError|timed out after [\d.]+ s)\)")


@pytest.fixture
def server(tiny_run, tmp_path):
    """(httpd, serve): a server that listens but does not accept until serve() is called; it logs (not quiet)."""
    app = App(tiny_run, device="cpu", jobs_root=tmp_path / "jobs")
    httpd = make_server(app, "127.0.0.1", 0, quiet=False)
    count_requests(httpd)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="difflo-serve", daemon=True)
    yield httpd, thread.start
    if thread.is_alive():
        httpd.shutdown()
    httpd.server_close()
    app.close()


def count_requests(httpd) -> None:
    """Keep httpd.in_flight: connections accepted whose request thread has not finished."""
    lock, accept, run = threading.Lock(), httpd.process_request, httpd.process_request_thread
    httpd.in_flight = 0

    def process_request(request, client_address):          # the accept loop, before the thread starts
        with lock:
            httpd.in_flight += 1
        accept(request, client_address)

    def process_request_thread(request, client_address):
        try:
            run(request, client_address)
        finally:
            with lock:
                httpd.in_flight -= 1

    httpd.process_request, httpd.process_request_thread = process_request, process_request_thread


def settle(httpd, timeout: float = 10.0) -> None:
    """Wait until the requests accepted so far are finished (their log lines are written)."""
    t0 = time.time()
    while httpd.in_flight:
        assert time.time() - t0 < timeout, f"{httpd.in_flight} requests still running"
        time.sleep(0.01)


def get(addr, path="/api/info", timeout=10.0) -> tuple[int, bytes]:
    """A raw HTTP/1.0 GET: (status, body)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return read_response(s)


def read_response(s: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_handler_timeout_and_backlog(server):
    httpd, _ = server
    assert Handler.timeout is not None and 1 <= Handler.timeout <= 120     # a stalled client is dropped
    assert httpd.request_queue_size >= 64
    assert httpd.daemon_threads


def test_burst_of_40_connects(server):
    """40 clients connect at once before the server accepts anything (backlog), then once it runs."""
    httpd, serve = server
    addr, n = httpd.server_address[:2], 40
    go, connected = threading.Barrier(n), threading.Barrier(n + 1)
    socks, errors, codes = [None] * n, [], [None] * n

    def client(k):
        go.wait()
        try:
            socks[k] = socket.create_connection(addr, timeout=3)        # completes in the listen queue
            socks[k].sendall(b"GET /api/info HTTP/1.0\r\n\r\n")
        except OSError as e:                                            # the default backlog (5) drops these
            errors.append(repr(e))
        connected.wait()
        if socks[k] is not None:
            with socks[k]:
                socks[k].settimeout(30)
                codes[k] = read_response(socks[k])[0]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    connected.wait(timeout=30)
    serve()                                                             # only now does it accept
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert codes == [200] * n

    def client2(k):                                                     # and a burst while it runs
        go.wait()
        code, body = get(addr)
        codes[k] = code if json.loads(body)["num_classes"] == 10 else -1

    codes = [None] * n
    threads = [threading.Thread(target=client2, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert codes == [200] * n


def test_early_disconnects_are_one_line(server, capfd):
    """Clients that close (or reset) before reading the response: one line each at most, no traceback."""
    httpd, serve = server
    serve()
    addr, n = httpd.server_address[:2], 12
    capfd.readouterr()
    for k in range(n):
        s = socket.create_connection(addr, timeout=5)
        if k % 2:                                                       # close with RST instead of FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" if k % 3 else
                  b'POST /api/upload HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}')
        s.close()
    assert get(addr)[0] == 200          # the server goes on (and has accepted the clients before it)
    settle(httpd)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
    gone = [line for line in err.splitlines() if "went away" in line]
    assert 1 <= len(gone) <= n, err
    assert all(GONE.fullmatch(line) for line in gone), gone


def test_stalled_clients_are_dropped(server, capfd):
    """A lying Content-Length (then silence) and an idle socket are dropped after the handler's timeout."""
    httpd, serve = server
    httpd.RequestHandlerClass.timeout = 0.3                             # the subclass made by make_server
    serve()
    addr = httpd.server_address[:2]
    capfd.readouterr()
    liar = socket.create_connection(addr, timeout=10)
    liar.sendall(b'POST /api/sample HTTP/1.0\r\nContent-Length: 5000\r\n\r\n{"n": 1')
    idle = socket.create_connection(addr, timeout=10)
    t0 = time.time()
    assert liar.recv(1024) == b"" and idle.recv(1024) == b""           # closed by the server, no answer
    assert time.time() - t0 < 5
    liar.close()
    idle.close()
    with socket.create_connection(addr, timeout=10) as s:               # a negative length: 400 at once
        s.sendall(b'POST /api/sample HTTP/1.0\r\nContent-Length: -1\r\n\r\n{}')
        code, body = read_response(s)
    assert code == 400 and json.loads(body)["error"] == "bad Content-Length"
    assert get(addr)[0] == 200
    settle(httpd)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    gone = [line for line in err.splitlines() if "went away" in line]
    assert len(gone) == 2 and all(GONE.fullmatch(line) for line in gone), err
    assert all("timed out after 0.3 s" in line for line in gone), gone
