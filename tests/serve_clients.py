#!/usr/bin/env python3
"""`magcache serve` as its users call it (issue 43): the `openai` Python package and curl, on
loopback, against the tiny FLUX.1 fixture folder.

    python3 tests/serve_clients.py target/debug/magcache

Starts the server on a free port, then: `client.models.list()`, `client.images.generate(...)` with
a seed (through `extra_body`), a repeated prompt reported `prompt_cached`, a bad size refused with
OpenAI's error (raised as `openai.BadRequestError` naming the field), a wrong API key refused
(`openai.AuthenticationError`), and the same picture fetched with curl; SIGTERM ends it with exit 0.
"""

import base64
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import openai

ROOT = pathlib.Path(__file__).resolve().parent
FOLDER = ROOT / "fixtures" / "pipelines" / "flux_tiny_folder"


def start(binary, run_file, key):
    p = subprocess.Popen(
        [binary, "serve", "--config", str(run_file), "--port", "0", "--api-key", key],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in p.stderr:
        if "listening on http://" in line:
            return p, line.strip().rsplit("http://", 1)[1]
    raise SystemExit(f"the server did not start (exit {p.wait()})")


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as d:
        run = pathlib.Path(d) / "tiny.toml"
        run.write_text(
            f'[model]\nfamily = "flux"\nweights = {json.dumps(str(FOLDER))}\n\n'
            '[prompt]\ntext = "a photo of a tiny cat"\nmax_sequence_length = 16\n\n'
            "[inputs]\nheight = 64\nwidth = 48\nseed = 0\n\n"
            "[sampling]\nsteps = 8\nguidance_scale = 3.5\n\n"
            '[cache]\nstrategy = "fbcache"\nthreshold = 0.5\n'
        )
        server, addr = start(binary, run, "sekrit")
        try:
            client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="sekrit")
            ids = [m.id for m in client.models.list().data]
            assert ids == ["tiny"], ids

            r = client.images.generate(
                model="tiny",
                prompt="a photo of a tiny cat",
                n=2,
                size="48x64",
                response_format="b64_json",
                extra_body={"seed": 7},
            )
            assert len(r.data) == 2
            pictures = [base64.b64decode(x.b64_json) for x in r.data]
            assert all(png_size(p) == (48, 64) for p in pictures)
            figures = r.model_extra["magcache"]
            assert [f["seed"] for f in figures] == [7, 8], figures
            assert all(f["calls"] == 8 and f["strategy"] == "fbcache" for f in figures)
            assert figures[1]["prompt_cached"], figures

            try:
                client.images.generate(model="tiny", prompt="x", size="0x0")
                raise AssertionError("a 0x0 picture was accepted")
            except openai.BadRequestError as e:
                assert e.body["param"] == "size", e.body

            try:
                openai.OpenAI(base_url=f"http://{addr}/v1", api_key="wrong").models.list()
                raise AssertionError("a wrong key was accepted")
            except openai.AuthenticationError:
                pass

            # curl, as a shell user would: the same request, the same first picture.
            body = json.dumps(
                {"model": "tiny", "prompt": "a photo of a tiny cat", "size": "48x64", "seed": 7}
            )
            out = subprocess.run(
                ["curl", "-sS", "--fail-with-body", f"http://{addr}/v1/images/generations",
                 "-H", "Authorization: Bearer sekrit", "-H", "Content-Type: application/json",
                 "-d", body],
                check=True, capture_output=True, text=True,
            ).stdout
            via_curl = base64.b64decode(json.loads(out)["data"][0]["b64_json"])
            assert via_curl == pictures[0], "curl's picture differs from the client's"
            health = subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{addr}/health"],
                check=True, capture_output=True, text=True,
            ).stdout
            assert health == "200", health
        finally:
            server.send_signal(signal.SIGTERM)
            t = time.time()
            code = server.wait(timeout=10)
        assert code == 0, f"exit {code} after SIGTERM"
        assert time.time() - t < 10
    print("serve clients: openai and curl ok")


if __name__ == "__main__":
    main()
