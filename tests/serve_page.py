#!/usr/bin/env python3
"""The page `magcache serve` serves at `/`, in a real headless browser (Debian's chromium): loaded
with `?auto=1` it lists the models, generates one picture dense and one cached through the API,
and shows both with their cache figures.

    python3 tests/serve_page.py target/debug/magcache [chromium]
"""

import re
import signal
import subprocess
import sys
import tempfile
import urllib.parse

from serve_common import start, tiny_run


def main():
    binary = sys.argv[1]
    browser = sys.argv[2] if len(sys.argv) > 2 else "chromium"
    with tempfile.TemporaryDirectory() as d:
        run = tiny_run(d)
        server, addr = start(binary, [run])
        try:
            query = urllib.parse.urlencode(
                {"model": "tiny", "prompt": "a photo of a tiny cat", "seed": 5, "dense": 1, "auto": 1})
            dom = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={d}/profile", "--virtual-time-budget=20000",
                 "--dump-dom", f"http://{addr}/?{query}"],
                check=True, capture_output=True, text=True, timeout=120,
            ).stdout
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=10)
    pictures = re.findall(r'<img src="data:image/png;base64,', dom)
    captions = re.findall(r'<figcaption class="figures">(.*?)</figcaption>', dom, re.S)
    assert len(pictures) == 2, dom[-2000:]
    assert captions[0].startswith("dense") and "none: 8/8 calls computed" in captions[0], captions
    assert captions[1].startswith("cached") and "fbcache" in captions[1], captions
    assert 'id="status">done<' in dom, dom[-2000:]
    print("serve page: generated dense and cached pictures in headless chromium")


if __name__ == "__main__":
    main()
