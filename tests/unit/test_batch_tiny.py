"""Batch jobs on the tiny model through the real CLI: a job killed with SIGKILL mid-run and run
again holds every row exactly once, with the committed rows not computed again and the same
results as an uninterrupted run; a changed input is refused; classify, learned, extract and
generate tasks all write their columns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from allinone import AllInOne
from allinone.errors import BatchConflictError
from allinone.models import resolve_model

pytest.importorskip("llama_cpp")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SRC = str(Path(__file__).resolve().parents[2] / "src")
TASK = 'name = "t"\nkind = "classify"\ninstructions.en = "Good or bad?"\n[[labels]]\nname = "good"\n[[labels]]\nname = "bad"\n'
PEOPLE = ('name = "people"\nkind = "extract"\ninstructions.en = "List the people."\n[output_schema]\ntype = "object"\n'
          'required = ["people"]\n[output_schema.properties.people]\ntype = "array"\nmaxItems = 3\n'
          'items = { type = "string", maxLength = 12 }\n')
WORDS = ["good", "bad", "fine", "awful", "great", "meh", "lovely", "dull", "the", "film", "was", "very"]


@pytest.fixture(scope="module")
def setup(tiny_gguf_path, tmp_path_factory):
    """A copy of the tiny model in a folder of its own (its SHA-256 sidecar goes there), a tasks
    folder, a cache folder, and the options every run uses."""
    root = tmp_path_factory.mktemp("batch_tiny")
    gguf = root / "model.gguf"
    gguf.write_bytes(tiny_gguf_path.read_bytes())
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "t.toml").write_text(TASK, encoding="utf-8")
    (tasks / "people.toml").write_text(PEOPLE, encoding="utf-8")
    options = {"model": str(gguf), "backend": "llamacpp", "n_ctx": 1024, "tasks_dir": tasks,
               "cache_dir": root / "cache", "n_threads": 1}
    return root, options


def flags(options) -> list[str]:
    return [arg for k, v in options.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "allinone.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]


def write_jsonl(path: Path, texts, *, ids: bool = True) -> Path:
    path.write_text("".join(json.dumps({"id": f"s{i}", "text": t} if ids else {"text": t}) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return path


def manifest(out: Path) -> dict:
    try:
        return json.loads(out.with_name(out.name + ".progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"rows": 0, "complete": False}


def test_sigkill_mid_run_then_the_same_command_gives_every_row_once(setup, tmp_path):
    root, options = setup
    n = 400
    src = write_jsonl(tmp_path / "in.jsonl", sentences(n))
    out = tmp_path / "out.jsonl"
    cmd = cli("batch", "t", "--input", str(src), "--output", str(out), "--chunk-rows", "4", "--json", *flags(options))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    deadline = time.monotonic() + 120
    while manifest(out)["rows"] < 12:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no rows committed in time"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed = manifest(out)
    assert proc.returncode == -signal.SIGKILL and not killed["complete"] and 12 <= killed["rows"] < n
    assert not out.exists()  # no final file until every row is in

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert (summary["resumed_from"], summary["rows_run"], summary["rows"]) == (killed["rows"], n - killed["rows"], n)
    assert (summary["rows_ok"], summary["rows_failed"]) == (n, 0)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"s{i}" for i in range(n)]  # once each, in order

    # the same rows as a run never interrupted (same chunks, so the same batches, bit for bit)
    with AllInOne.load(**options) as ai:
        ai.batch("t", src, tmp_path / "whole.jsonl", chunk_rows=4)
    assert lines == (tmp_path / "whole.jsonl").read_text(encoding="utf-8").splitlines()

    # a finished job is left alone; a changed input is refused until --restart
    again = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["rows_run"] == 0
    with src.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "late", "text": "one more"}) + "\n")
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert refused.returncode == 2
    assert "another input file (changed since it started)" in refused.stderr and "--restart" in refused.stderr
    assert out.read_text(encoding="utf-8").splitlines() == lines


def test_csv_to_parquet_through_the_cli_matches_run(setup, tmp_path):
    root, options = setup
    texts = sentences(30, seed=1) + ["", "x" * 100]
    src = tmp_path / "in.csv"
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.table({"text": texts}), src)
    out = tmp_path / "out.parquet"
    proc = subprocess.run(cli("batch", "t", "-i", str(src), "-o", str(out), "--chunk-rows", "8", "--json",
                              "--max-input-chars", "80", *flags(options)),
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["rows"], summary["rows_ok"], summary["rows_failed"]) == (32, 30, 2)
    assert {"elapsed_s", "rows_per_s", "peak_rss_mb"} <= set(summary)
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == [str(i) for i in range(32)]
    assert [r["error"] for r in rows[-2:]] == ["text is empty", "text is 100 characters; the limit is 80"]
    with AllInOne.load(**options) as ai:
        for row, text in zip(rows[:30], texts):
            single = ai.run("t", text)
            assert row["scores"] == pytest.approx(single.scores, abs=1e-4)


def test_a_learned_task_serves_the_batch_and_a_new_fit_is_a_changed_task(setup, tmp_path):
    pytest.importorskip("sklearn")
    from allinone.learn import artifacts
    from allinone.learn.artifacts import Artifact, ArtifactStore
    from allinone.learn.heads import fit_linear

    root, options = setup
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.toml").write_text(TASK, encoding="utf-8")
    options = {**options, "tasks_dir": tasks}
    sha = resolve_model(options["model"]).fingerprint()
    def learn(flip: bool) -> None:
        x = np.random.default_rng(0).normal(size=(40, 2))
        y = ["good" if (a > b) != flip else "bad" for a, b in x]
        meta = {"task": "t", "kind": "classify", "method": "calibrate", "model_sha256": sha,
                "labels": ["good", "bad"], "features": {"layer": None}}
        target = ArtifactStore(options["cache_dir"], tasks).target("t", sha, declared_in=tasks / "t.toml")
        artifacts.save(Artifact(meta, fit_linear(x, y, ["good", "bad"]).tensors()), target)

    learn(flip=False)
    texts = sentences(12, seed=2)
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    out = tmp_path / "out.jsonl"

    class Stop(Exception):
        pass

    def stop(done, total):
        if done >= 4:
            raise Stop

    with AllInOne.load(**options) as ai:
        assert ai.describe_task("t")["method"] == "calibrate"
        with pytest.raises(Stop):
            ai.batch("t", src, out, chunk_rows=4, progress=stop)
        learned = [ai.run("t", t).scores for t in texts]
    learn(flip=True)  # fit again: the task now answers otherwise
    with AllInOne.load(**options) as ai, pytest.raises(BatchConflictError, match="another learned artifact"):
        ai.batch("t", src, out, chunk_rows=4)
    learn(flip=False)  # the first fit back, served by prompting: the refusal names what changed
    with AllInOne.load(**{**options, "learned": False}) as ai, pytest.raises(BatchConflictError, match="another learned artifact"):
        ai.batch("t", src, out, chunk_rows=4)
    learn(flip=False)  # the first fit back: the job goes on
    with AllInOne.load(**options) as ai:
        summary = ai.batch("t", src, out, chunk_rows=4)
    assert summary.resumed_from == 4 and summary.rows == 12
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for row, scores in zip(rows, learned):
        assert row["scores"] == pytest.approx(scores, abs=1e-4)


def test_extract_and_generate_tasks_write_their_columns(setup, tmp_path):
    root, options = setup
    src = write_jsonl(tmp_path / "in.jsonl", ["Ann met Bob in Paris.", "Carl and Dana", ""], ids=False)
    with AllInOne.load(**options) as ai:
        ai.batch("people", src, tmp_path / "people.parquet", max_tokens=24, temperature=0)
        ai.batch("chat", src, tmp_path / "chat.parquet", max_tokens=4, temperature=0)
        reply = ai.run("chat", "Carl and Dana", max_tokens=4, temperature=0)
    people = pq.read_table(tmp_path / "people.parquet")
    assert people.schema.field("people").type == pa.list_(pa.string())
    assert people.column("error").to_pylist() == [None, None, "text is empty"]
    assert all(isinstance(p, list) for p in people.column("people").to_pylist()[:2])
    chat = pq.read_table(tmp_path / "chat.parquet").to_pylist()
    assert chat[1]["text"] == reply.text and chat[1]["usage"]["completion_tokens"] == reply.usage.completion_tokens
    assert chat[2]["text"] is None and chat[2]["error"] == "text is empty"
