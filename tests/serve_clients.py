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
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import openai

# The client marks its video methods deprecated (its own service's schedule), not ours.
warnings.filterwarnings("ignore", category=DeprecationWarning)

from serve_common import ROOT, start, tiny_run

EXAMPLES = ROOT.parent / "examples"
FIRST_FRAME = ROOT / "fixtures" / "pipelines" / "wan22_i2v_first_frame.png"


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def video_done(client, video):
    t = time.time()
    while video.status in ("queued", "in_progress"):
        assert time.time() - t < 300, video
        time.sleep(0.2)
        video = client.videos.retrieve(video.id)
    return video


def videos(client):
    """Wan2.1 text-to-video and Wan2.2 image-to-video with a first frame: created, followed,
    downloaded as MP4, deleted (404 after); a queued job deleted is cancelled."""
    v = client.videos.create(model="wan21_tiny_prompted", prompt="a sailboat on a lake",
                             size="32x32", extra_body={"num_frames": 5, "seed": 1})
    assert v.status in ("queued", "in_progress", "completed"), v
    v = video_done(client, v)
    assert v.status == "completed", v
    assert v.model_extra["magcache"]["seed"] == 1
    mp4 = client.videos.download_content(v.id).read()
    assert mp4[4:8] == b"ftyp", mp4[:16]
    with open(FIRST_FRAME, "rb") as f:
        i2v = client.videos.create(model="wan22_i2v_tiny_prompted", prompt="a boat",
                                   size="32x48", input_reference=f, extra_body={"num_frames": 9})
    i2v = video_done(client, i2v)
    assert i2v.status == "completed", i2v
    assert client.videos.download_content(i2v.id).read()[4:8] == b"ftyp"
    ids = {x.id for x in client.videos.list().data}
    assert {v.id, i2v.id} <= ids, ids
    # Newest first, a page at a time, as OpenAI lists them.
    page = client.videos.list(limit=1)
    assert [x.id for x in page.data] == [i2v.id] and page.has_more, page
    assert [x.id for x in client.videos.list(limit=1, after=i2v.id).data] == [v.id]
    assert [x.id for x in client.videos.list(order="asc").data][:2] == [v.id, i2v.id]
    assert i2v.size == "32x48", i2v
    client.videos.delete(v.id)
    try:
        client.videos.retrieve(v.id)
        raise AssertionError("a deleted video is still there")
    except openai.NotFoundError:
        pass
    try:
        client.videos.create(model="wan21_tiny_prompted", prompt="x",
                             input_reference=("x.png", b"not a picture", "image/png"))
        raise AssertionError("a corrupt input_reference was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "input_reference", e.body


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as d:
        run = tiny_run(d)
        server, addr = start(
            binary,
            [run, EXAMPLES / "flux2_klein_tiny_prompted.toml", EXAMPLES / "wan21_tiny_prompted.toml",
             EXAMPLES / "wan22_i2v_tiny_prompted.toml"],
            "--api-key",
            "sekrit",
        )
        try:
            client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="sekrit")
            ids = [m.id for m in client.models.list().data]
            assert ids == ["tiny", "flux2_klein_tiny_prompted", "wan21_tiny_prompted",
                           "wan22_i2v_tiny_prompted"], ids
            assert client.models.retrieve("tiny").id == "tiny"
            r = client.images.generate(model="flux2_klein_tiny_prompted", prompt="a red fox",
                                       size="64x64", response_format="b64_json")
            assert png_size(base64.b64decode(r.data[0].b64_json)) == (64, 64)
            videos(client)

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
