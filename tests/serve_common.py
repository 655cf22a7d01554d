"""What the `magcache serve` client tests share: the tiny FLUX.1 run file and starting the server
on a free port."""

import json
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent
FOLDER = ROOT / "fixtures" / "pipelines" / "flux_tiny_folder"


def tiny_run(folder):
    """A prompted FLUX.1 run file on the tiny fixture folder, `tiny.toml` in `folder`."""
    run = pathlib.Path(folder) / "tiny.toml"
    run.write_text(
        f'[model]\nfamily = "flux"\nweights = {json.dumps(str(FOLDER))}\n\n'
        '[prompt]\ntext = "a photo of a tiny cat"\nmax_sequence_length = 16\n\n'
        "[inputs]\nheight = 64\nwidth = 48\nseed = 0\n\n"
        "[sampling]\nsteps = 8\nguidance_scale = 3.5\n\n"
        '[cache]\nstrategy = "fbcache"\nthreshold = 0.5\n'
    )
    return run


def start(binary, run_files, *args):
    """`magcache serve` on a free port: the process and its `host:port`."""
    configs = [a for f in run_files for a in ("--config", str(f))]
    p = subprocess.Popen([binary, "serve", *configs, "--port", "0", *args],
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "listening on http://" in line:
            return p, line.strip().rsplit("http://", 1)[1]
    raise SystemExit(f"the server did not start (exit {p.wait()})")
