"""The batch job on a real Ray cluster started here: a head and a worker node on 127.0.0.1, one
CPU each (``ray start`` subprocesses, stopped afterwards). Ray results equal the local run's
byte for byte, both nodes label chunks, and a job interrupted locally is finished on Ray through
the CLI (``--ray-address``) without redoing its committed rows."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from allinone import AllInOne
from fixtures.procs import stop

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("llama_cpp")
pq = pytest.importorskip("pyarrow.parquet")

SRC = str(Path(__file__).resolve().parents[2] / "src")
TASK = 'name = "t"\nkind = "classify"\ninstructions.en = "Good or bad?"\n[[labels]]\nname = "good"\n[[labels]]\nname = "bad"\n'
WORDS = ["good", "bad", "fine", "awful", "great", "meh", "lovely", "dull", "the", "film", "was", "very"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """The address of a two-node local Ray cluster; this process is connected to it."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    address = f"127.0.0.1:{port}"
    # without token authentication: seen with Ray 2.60, once ~/.ray/auth_token exists (ray.init()
    # writes it when it starts a local cluster), `ray start` heads want the token, drivers send none
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        yield from _cluster(temp, port, address)


def _cluster(temp: str, port: int, address: str):
    env = {**os.environ, "PYTHONPATH": SRC, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1",
             "--node-ip-address=127.0.0.1", "--object-store-memory=80000000", "--disable-usage-stats"]
    procs = [subprocess.Popen([*start, "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert procs[0].poll() is None, "ray start --head exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(0.3)
        procs.append(subprocess.Popen([*start, f"--address={address}"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ray.init(address=address, log_to_driver=False)
        while sum(n["Alive"] for n in ray.nodes()) < 2 or ray.cluster_resources().get("CPU", 0) < 2:
            assert time.monotonic() < deadline, f"the worker node did not join: {ray.nodes()}"
            time.sleep(0.3)
        yield address
    finally:
        ray.shutdown()
        stop(procs)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def options(tiny_gguf_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_ray")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "t.toml").write_text(TASK, encoding="utf-8")
    return {"model": str(tiny_gguf_path), "backend": "llamacpp", "n_ctx": 1024, "tasks_dir": tasks,
            "cache_dir": root / "cache", "n_threads": 1}


def write_input(path: Path, n: int) -> Path:
    rng = np.random.default_rng(3)
    lines = [json.dumps({"id": f"s{i}", "text": " ".join(rng.choice(WORDS, size=rng.integers(3, 9)))}) for i in range(n)]
    lines[5] = "this line is not JSON"
    lines[11] = json.dumps({"id": "empty", "text": "  "})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_ray_results_equal_local_results_row_for_row(cluster, options, tmp_path):
    # enough chunks that the actor which starts second still gets some: with 8 chunks (5 s of
    # work) the first actor once labelled them all before the other had loaded its model
    src = write_input(tmp_path / "in.jsonl", 240)
    with AllInOne.load(**options) as ai:
        local = ai.batch("t", src, tmp_path / "local.jsonl", chunk_rows=4)
    on_ray = AllInOne.batch_on_ray("t", src, tmp_path / "ray.jsonl", address=cluster, actors=2, chunk_rows=4, **options)
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    assert (on_ray.rows, on_ray.rows_ok, on_ray.rows_failed) == (local.rows, local.rows_ok, local.rows_failed) == (240, 238, 2)
    assert on_ray.actors == 2 and on_ray.nodes == 2  # the head and the worker both labelled chunks
    assert on_ray.actor_peak_rss_mb > 0


def test_a_job_interrupted_locally_is_finished_on_ray_by_the_cli(cluster, options, tmp_path):
    src = write_input(tmp_path / "in.jsonl", 48)
    out = tmp_path / "out.parquet"

    class Stop(Exception):
        pass

    def interrupt(done, total):
        if done >= 16:
            raise Stop

    with AllInOne.load(**options) as ai:
        ai.batch("t", src, tmp_path / "whole.parquet", chunk_rows=8)
        with pytest.raises(Stop):
            ai.batch("t", src, out, chunk_rows=8, progress=interrupt)
    flags = [arg for k, v in options.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
    proc = subprocess.run([sys.executable, "-m", "allinone.cli", "batch", "t", "-i", str(src), "-o", str(out),
                           "--chunk-rows", "8", "--ray-address", cluster, "--json", *flags],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["resumed_from"], summary["rows_run"], summary["rows"]) == (16, 32, 48)
    assert summary["actors"] == 2
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "whole.parquet"))
