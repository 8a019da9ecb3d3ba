"""`python demo/app.py`: a bad start-up option is a one-line usage error (exit status 2)
before the model is even looked at; the script serves, and abuse leaves no traceback in
its log."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys

import pytest
from test_demo import PHOTOS, REPO, parse_answers

APP = REPO / "demo" / "app.py"
MISSING_MODEL = "/nonexistent/model.safetensors"


def run_app(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(APP), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.mark.parametrize("args", [
    ["--port", "99999"], ["--port", "-1"], ["--port", "80.5"], ["--port", "0x50"], ["--port", ""],
    ["--port", "\u0668\u0660"],
    ["--max-upload-mb", "nan"], ["--max-upload-mb", "inf"], ["--max-upload-mb", "0"], ["--max-upload-mb", "1e9"],
    ["--max-upload-mb", "-5"], ["--max-upload-mb", "65"],
    ["--memory-budget-mb", "10"], ["--memory-budget-mb", "1e12"], ["--max-in-flight", "0"],
    ["--max-connections", "100000"],
    ["--host", "junk!"], ["--host", "exa mple"], ["--host", ""], ["--host", "::::"], ["--host", "a" * 300],
    ["--host", "a..b"], ["--device", "tpu"], ["--no-such-option"],
], ids=lambda args: " ".join(args)[:40])
def test_bad_option_is_one_line_exit_2_before_loading(args):
    result = run_app(*args, "--model", MISSING_MODEL)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("demo/app.py: error: ") and line.endswith("(see --help)")
    assert "nonexistent" not in line  # the model file was never opened


def test_address_that_cannot_be_bound_is_exit_2_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for host, port_arg in (("127.0.0.1", port), ("192.0.2.1", "0")):  # in use; not this machine's
            result = run_app("--host", host, "--port", port_arg, "--model", MISSING_MODEL)
            assert result.returncode == 2, result.stderr
            [line] = result.stderr.splitlines()
            assert line.startswith(f"demo/app.py: error: cannot listen on {host} port {port_arg}: ")


@pytest.mark.slow  # imports torch in a fresh process
def test_missing_model_is_one_line_exit_1():
    result = run_app("--port", "0", "--model", MISSING_MODEL)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("demo/app.py: error: ") and "nonexistent" in line


def exchange(port: int, request: bytes) -> list[tuple[int, dict]]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        return parse_answers(b"".join(iter(lambda: sock.recv(65536), b"")))


@pytest.mark.slow
def test_script_serves_and_abuse_leaves_no_traceback(tiny_model_file):
    process = subprocess.Popen([sys.executable, str(APP), "--model", str(tiny_model_file), "--port", "0",
                                "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        photo = PHOTOS[0].read_bytes()
        [(status, answer)] = exchange(port, b"POST /api/caption?n_best=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                      + f"Content-Length: {len(photo)}\r\n\r\n".encode() + photo)
        assert status == 200 and len(answer["alternatives"]) == 2
        for value in (b"+5", b" 5", b"5 ", "\u0665".encode(), b"0x10", b"1e3", b"-1", b"9" * 5000):
            assert exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: " + value
                            + b"\r\n\r\n")[0][0] == 400
        assert exchange(port, b"POST /api/caption HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5\r\nhello\r\n0\r\n\r\n")[0][0] == 411
        assert exchange(port, b"GARBAGE\r\n\r\n")[0][0] == 400
        assert exchange(port, b"POST /api/caption HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                        b"Content-Length: 4\r\n\r\nnope")[0][0] == 400
        parts = b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n\r\n" * 1000 + b"--b--\r\n"
        assert exchange(port, b"POST /api/caption HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                        b"Content-Type: multipart/form-data; "
                        b"boundary=b\r\n" + f"Content-Length: {len(parts)}\r\n\r\n".encode() + parts)[0][0] == 400
        [(status, health)] = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200 and json.dumps(health)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Error" not in err
    assert err.count('"GET /healthz HTTP/1.1" 400') == 8  # the access log names each refusal
