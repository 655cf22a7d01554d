#!/usr/bin/env python3
"""A bounded load test of `magcache serve` on loopback (issue 43): 200 requests from 16 clients at
once against a queue of 8. Every answer must be a valid picture or a 429 (with Retry-After), the
server's resident memory must stay flat after warm-up, and `/metrics` must add up.

    python3 tests/serve_load.py target/debug/magcache [requests] [clients]

Prints the figures (docs/benchmarks.md, "Serving").
"""

import base64
import concurrent.futures
import json
import signal
import sys
import tempfile
import urllib.error
import urllib.request

from serve_common import start, tiny_run


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(addr, i):
    body = json.dumps({"model": "tiny", "prompt": f"a photo of cat number {i % 10}",
                       "size": "48x64", "seed": i}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/images/generations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            v = json.load(r)
            png = base64.b64decode(v["data"][0]["b64_json"])
            assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
            assert v["magcache"][0]["calls"] == 8
            return 200
    except urllib.error.HTTPError as e:
        assert e.code == 429, (e.code, e.read())
        assert e.headers.get("Retry-After"), "429 without Retry-After"
        json.loads(e.read())["error"]["message"]
        return 429


def client(addr, i):
    """One user: asks until it gets its picture, waiting out each 429; the 429s it saw."""
    import time
    refused = 0
    while post(addr, i) == 429:
        refused += 1
        assert refused < 2000, "never got through"
        time.sleep(0.05)
    return refused


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main():
    binary = sys.argv[1]
    total = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    clients = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    with tempfile.TemporaryDirectory() as d:
        run = tiny_run(d)
        server, addr = start(binary, [run], "--max-queue", "8")
        try:
            # Warm-up: every prompt of the run once, one at a time.
            for i in range(10):
                assert post(addr, i) == 200
            warm = rss_mb(server.pid)
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                refusals = list(pool.map(lambda i: client(addr, i), range(total)))
            after = rss_mb(server.pid)
            text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=10)
    ok, busy = total, sum(refusals)
    served = metric(text, 'magcache_requests_total{route="/v1/images/generations",status="200"}')
    refused = metric(text, 'magcache_requests_total{route="/v1/images/generations",status="429"}')
    assert (served, refused) == (ok + 10, busy), (served, refused, ok, busy)
    assert metric(text, "magcache_generation_seconds_count") == ok + 10
    calls = metric(text, 'magcache_transformer_calls_total{kind="computed"}') + metric(
        text, 'magcache_transformer_calls_total{kind="reused"}')
    assert calls == 8 * (ok + 10), calls
    assert metric(text, "magcache_queue_depth") == 0
    assert code == 0, f"exit {code} after SIGTERM"
    growth = after - warm
    print(f"serve load: {total} requests, {clients} clients, queue 8: {ok} pictures, {busy} x 429; "
          f"RSS {warm:.0f} MB after warm-up, {after:.0f} MB after ({growth:+.1f} MB); metrics add up")
    assert growth < 64, f"memory grew {growth:.1f} MB under load"


if __name__ == "__main__":
    main()
