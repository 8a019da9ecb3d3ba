"""The demo's memory bound is real, measured on the running script: a burst of six
concurrent worst-case uploads (9400 x 9400 RGBA PNG, the most pixels Pillow allows, each
~880 MiB to decode and preprocess) keeps the server's resident size within its decode budget
above its resting size, the size returns to rest afterwards, and an ordinary 224 x 224 photo
sent throughout is answered within seconds. Slow (about a minute): `pytest -m slow`."""
from __future__ import annotations

import http.client
import io
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from test_demo import PHOTOS, REPO

pytestmark = pytest.mark.slow
MIB = 1024 * 1024
BUDGET_MIB = 1536  # the default --memory-budget-mb


def worst_case_png() -> bytes:
    """9400 x 9400 RGBA: ~88 megapixels, just under Pillow's limit; a smooth pattern keeps
    the file small (a few hundred KB) while decoding costs the full size."""
    grey = Image.linear_gradient("L").resize((9400, 9400), Image.BILINEAR)
    image = Image.merge("RGBA", (grey, grey.transpose(Image.Transpose.ROTATE_90),
                                 grey.transpose(Image.Transpose.FLIP_TOP_BOTTOM), Image.new("L", grey.size, 200)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def small_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(PHOTOS[0]).convert("RGB").resize((224, 224)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def post(port: int, data: bytes) -> tuple[int, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
    started = time.perf_counter()
    try:
        connection.request("POST", "/api/caption", body=data, headers={"Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        connection.close()


def test_burst_of_worst_case_uploads_stays_in_budget_and_returns(tiny_model_file, record_property):
    heavy, small = worst_case_png(), small_jpeg()
    process = subprocess.Popen([sys.executable, str(REPO / "demo" / "app.py"), "--model", str(tiny_model_file),
                                "--port", "0", "--quiet", "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+)/", process.stdout.readline()).group(1))
        alone = []
        for _ in range(6):
            status, latency = post(port, small)
            assert status == 200
            alone.append(latency)
        time.sleep(1)
        baseline = rss_mib(process.pid)
        peak = [baseline]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], rss_mib(process.pid))
                time.sleep(0.02)
        threading.Thread(target=sample, daemon=True).start()
        heavy_results: list[tuple[int, float]] = []
        burst = [threading.Thread(target=lambda: heavy_results.append(post(port, heavy))) for _ in range(6)]
        started = time.perf_counter()
        for thread in burst:
            thread.start()
        time.sleep(0.5)
        latencies = []
        while any(thread.is_alive() for thread in burst):
            status, latency = post(port, small)
            assert status == 200
            latencies.append(latency)
            time.sleep(0.2)
        burst_seconds = time.perf_counter() - started
        time.sleep(3)
        sampling.set()
        after = rss_mib(process.pid)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=60)
    statuses = sorted(status for status, _ in heavy_results)
    figures = {"baseline_mib": round(baseline), "peak_mib": round(peak[0]), "after_3s_mib": round(after),
               "burst_s": round(burst_seconds, 1), "normal_alone_ms": round(sorted(alone[1:])[2] * 1000),
               "normal_max_ms": round(max(latencies) * 1000),
               "normal_median_ms": round(sorted(latencies)[len(latencies) // 2] * 1000), "heavy_statuses": statuses}
    print(f"\ndemo burst of 6 worst-case uploads: {figures}")
    for key, value in figures.items():
        record_property(key, value)
    assert "Traceback" not in err
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 3  # 503 only after 60 s in the queue
    assert peak[0] - baseline <= BUDGET_MIB + 64, figures   # the budget, plus bodies and small images
    assert after - baseline <= 64, figures                  # freed memory went back to the kernel
    assert max(latencies) < 3, figures                      # an ordinary photo is never starved
