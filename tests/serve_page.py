#!/usr/bin/env python3
"""The page `magcache serve` serves at `/`, in a real headless browser (Debian's chromium): loaded
with `?auto=1` it lists the models, generates one picture dense and one cached through the API,
and shows both with their cache figures.

    python3 tests/serve_page.py target/debug/magcache [chromium]
"""

import json
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent
FOLDER = ROOT / "fixtures" / "pipelines" / "flux_tiny_folder"


def main():
    binary = sys.argv[1]
    browser = sys.argv[2] if len(sys.argv) > 2 else "chromium"
    with tempfile.TemporaryDirectory() as d:
        run = pathlib.Path(d) / "tiny.toml"
        run.write_text(
            f'[model]\nfamily = "flux"\nweights = {json.dumps(str(FOLDER))}\n\n'
            '[prompt]\ntext = "a photo of a tiny cat"\nmax_sequence_length = 16\n\n'
            "[inputs]\nheight = 64\nwidth = 48\nseed = 0\n\n"
            "[sampling]\nsteps = 8\nguidance_scale = 3.5\n\n"
            '[cache]\nstrategy = "fbcache"\nthreshold = 0.5\n'
        )
        server = subprocess.Popen([binary, "serve", "--config", str(run), "--port", "0"],
                                  stderr=subprocess.PIPE, text=True)
        try:
            addr = None
            for line in server.stderr:
                if "listening on http://" in line:
                    addr = line.strip().rsplit("http://", 1)[1]
                    break
            assert addr, "the server did not start"
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
