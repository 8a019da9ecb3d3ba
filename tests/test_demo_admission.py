"""Every image costs bounded memory in the demo, and the bound is real: an upload's cost is
computed from its header before decoding, admitted against one shared budget (never
exceeded), refused with 413 when it alone is over the per-image limit (without decoding
it), and a large image in flight does not hold up an ordinary photo."""
from __future__ import annotations

import io
import os
import random
import re
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image
from test_demo import PHOTOS, call, http_server, load_captioner

from demo.admission import BudgetTimeout, MemoryBudget, upload_cost
from demo.limits import MIB, Limits

DRAFT = (224, 224)


def png_header(width: int, height: int, color_type: int = 6, bit_depth: int = 8) -> bytes:
    """A PNG whose header declares width x height but whose pixel data is a few bytes:
    decoding it would fail, so a 413 proves the refusal came from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def webp_header(width: int, height: int) -> bytes:
    """An extended (VP8X) WebP header declaring a width x height canvas, and nothing else."""
    vp8x = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# -------------------------------------------------------------------------------- cost


def test_cost_covers_decoding_and_preprocessing(tmp_path):
    """10 bytes a pixel at least (the RGB image plus torchvision's two copies), whatever the
    file size; a photo's JPEG draft decode keeps an ordinary photo cheap."""
    big = upload_cost(write(tmp_path, "big.png", png_header(9000, 9000)), DRAFT, 10 * MIB)
    assert big >= 10 * 9000 * 9000
    grey = upload_cost(write(tmp_path, "grey.png", png_header(9000, 9000, color_type=0)), DRAFT, 10 * MIB)
    assert grey >= 10 * 9000 * 9000  # a 1-byte-a-pixel file still becomes a 4-byte RGB image
    webp = upload_cost(write(tmp_path, "big.webp", webp_header(9400, 9400)), DRAFT, 10 * MIB)
    assert webp > 1536 * MIB  # the WebP decoder's canvas and copies
    photo = upload_cost(str(PHOTOS[0]), DRAFT, 10 * MIB)
    assert photo < Limits().small_image_bytes


# ------------------------------------------------------------------------------ budget


def hold_in_thread(budget: MemoryBudget, cost: int, release: threading.Event, timeout: float = 10):
    """Hold `cost` from another thread until `release` is set; returns (thread, admitted)."""
    admitted = threading.Event()

    def run() -> None:
        with budget.hold(cost, timeout):
            admitted.set()
            release.wait(10)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, admitted


def test_budget_is_never_exceeded_under_contention():
    budget = MemoryBudget(total=200, reserve=40, small=20)
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            with budget.hold(rng.randint(1, budget.largest), timeout=30):
                with lock:
                    seen.append((budget.used, budget.large_used))
                time.sleep(rng.random() / 1000)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 320
    assert max(used for used, _ in seen) <= 200 and max(large for _, large in seen) <= 160
    assert budget.used == 0 and budget.peak <= 200


def test_small_images_pass_while_large_ones_wait_but_only_within_the_reserve():
    budget = MemoryBudget(total=100, reserve=40, small=20)
    release = threading.Event()
    try:
        _, first = hold_in_thread(budget, 50, release)
        assert first.wait(5)
        _, second = hold_in_thread(budget, 50, release)  # 50 + 50 > 60: waits
        time.sleep(0.1)
        assert not second.is_set() and budget.waiting == 1
        smalls = [hold_in_thread(budget, 20, release)[1] for _ in range(3)]
        time.sleep(0.2)
        # Two fit in the reserve (40) while a large image waits; the third waits too.
        assert [s.is_set() for s in smalls] == [True, True, False]
    finally:
        release.set()


def test_large_images_are_admitted_first_come_first_served():
    budget = MemoryBudget(total=100, reserve=40, small=20)
    first_release, second_release, third_release = threading.Event(), threading.Event(), threading.Event()
    _, first = hold_in_thread(budget, 30, first_release)
    assert first.wait(5)
    _, second = hold_in_thread(budget, 40, second_release)   # 30 + 40 > 60: waits
    time.sleep(0.05)
    _, third = hold_in_thread(budget, 25, third_release)     # 30 + 25 fits, but it is behind the 40
    time.sleep(0.2)
    assert not second.is_set() and not third.is_set()
    first_release.set()
    assert second.wait(5)
    time.sleep(0.1)
    assert not third.is_set()                                 # 40 + 25 > 60
    second_release.set()
    assert third.wait(5)
    third_release.set()


def test_waiting_is_bounded_and_impossible_costs_are_refused():
    budget = MemoryBudget(total=100, reserve=40, small=20)
    release = threading.Event()
    try:
        _, held = hold_in_thread(budget, 60, release)
        assert held.wait(5)
        started = time.monotonic()
        with pytest.raises(BudgetTimeout), budget.hold(30, timeout=0.2):
            pass
        assert 0.15 < time.monotonic() - started < 2
        assert budget.waiting == 0
        with pytest.raises(ValueError), budget.hold(61, timeout=1):
            pass
    finally:
        release.set()


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
def make_server(tiny_model_file):
    """Start demo servers with given limits; all are stopped after the test."""
    stack = []

    def start(limits: Limits):
        srv = http_server.make_server(load_captioner(tiny_model_file), "127.0.0.1", 0, quiet=True, limits=limits)
        context = http_server.serving(srv)
        context.__enter__()
        stack.append(context)
        return srv
    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.mark.parametrize("limits, image, needs", [
    (Limits(), webp_header(9400, 9400), "MiB, over the limit of 1,408 MiB per image"),
    (Limits(memory_budget_bytes=256 * MIB), png_header(4000, 4000), "over the limit of 128 MiB per image"),
    (Limits(memory_budget_bytes=256 * MIB), png_header(6000, 3000, color_type=0), "over the limit of 128 MiB"),
], ids=["webp-default-budget", "rgba-png-small-budget", "grey-png-small-budget"])
def test_image_too_costly_by_its_header_is_413_without_decoding(make_server, limits, image, needs):
    server = make_server(limits)
    measured = peak_rss_reset()
    status, _, answer = call(server, "POST", "/api/caption", image)
    assert status == 413, answer
    assert answer["error"].startswith("image too large to decode here: it needs about ") and needs in answer["error"]
    assert server.service.budget.peak == 0  # never admitted
    if measured:
        assert peak_rss() - int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) \
            * 1024 < 64 * MIB


def heavy_png(width: int = 2800, height: int = 2800) -> bytes:
    """A real image costing ~91 MiB to decode: 'large' under a 256 MiB budget, whose per-image
    limit is 128 MiB, so two of them cannot be decoded at once."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def gate_large(monkeypatch, server, size: int) -> threading.Event:
    """Hold uploads of `size` bytes inside decoding until the returned event is set."""
    gate = threading.Event()
    prepare = server.service.prepare

    def gated(path: str):
        if os.path.getsize(path) == size:
            gate.wait(30)
        return prepare(path)
    monkeypatch.setattr(server.service, "prepare", gated)
    return gate


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_normal_photo_is_served_while_large_images_decode_and_wait(make_server, monkeypatch):
    server = make_server(Limits(memory_budget_bytes=256 * MIB))
    heavy = heavy_png()
    gate = gate_large(monkeypatch, server, len(heavy))
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(call(server, "POST", "/api/caption", heavy)[0]))
               for _ in range(2)]
    try:
        for t in threads:
            t.start()
        # One large image decoding (held at the gate), the other waiting for memory.
        wait_until(lambda: server.service.state()["decode_bytes_in_use"] > 64 * MIB
                   and server.service.state()["uploads_waiting_for_memory"] == 1)
        assert not list(Path(tempfile.gettempdir()).glob("captioner-upload-*"))  # uploads stay in memory
        started = time.perf_counter()
        status, _, answer = call(server, "POST", "/api/caption", PHOTOS[0].read_bytes())
        latency = time.perf_counter() - started
        assert status == 200 and "caption" in answer
        assert latency < 3, f"ordinary photo took {latency:.1f} s behind large images"
        assert server.service.state()["uploads_waiting_for_memory"] == 1  # the large ones are still there
    finally:
        gate.set()
        for t in threads:
            t.join(timeout=60)
    assert results == [200, 200]
    assert server.service.budget.peak <= 256 * MIB and server.service.state()["decode_bytes_in_use"] == 0


def test_large_image_waiting_too_long_is_503(make_server, monkeypatch):
    server = make_server(Limits(memory_budget_bytes=256 * MIB, admission_seconds=0.5))
    heavy = heavy_png()
    gate = gate_large(monkeypatch, server, len(heavy))
    first = threading.Thread(target=call, args=(server, "POST", "/api/caption", heavy))
    try:
        first.start()
        wait_until(lambda: server.service.state()["decode_bytes_in_use"] > 64 * MIB)
        started = time.monotonic()
        status, headers, answer = call(server, "POST", "/api/caption", heavy)
        assert status == 503 and headers["Retry-After"] == "5" and "busy" in answer["error"]
        assert 0.4 < time.monotonic() - started < 3
    finally:
        gate.set()
        first.join(timeout=60)
