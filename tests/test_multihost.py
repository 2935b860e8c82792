"""Two CPU processes on localhost train together (jax.distributed + gloo) and agree on the loss."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # one CPU device per process: the mesh spans both processes
    common = [sys.executable, "-m", "longvid_jax.train", "--config=configs/tdc.py",
              f"--workdir={tmp_path / 'run'}", f"--coordinator_address=localhost:{port}",
              "--num_processes=2", "--config.total_steps=3", "--config.log_every=1",
              "--config.ckpt_every=3", "--config.input.batch_size=1",
              "--config.input.num_workers=0", "--config.input.max_frames=8"]
    procs = [subprocess.Popen(common + [f"--process_id={i}"], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "process 1 of 2; 1 local / 2 global devices" in outs[1][1]
    logged = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", outs[1][1])]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        written = [json.loads(line)["loss"] for line in f]
    assert len(written) == 3 and len(logged) == 3
    assert [round(x, 6) for x in written] == logged  # one global loss, seen by both processes
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
