"""Batch jobs on a scripted fake model: every input format, bad rows recorded and counted, the
output's columns per task kind, and resuming: a crash after a commit, a torn tail, a changed
input, task or parameters refused, ``restart``, a finished job left alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from allinone import AllInOne, Settings
from allinone.batch.columns import Columns, arrow_type
from allinone.batch.io import Source
from allinone.batch.runner import Job, label_chunk
from allinone.engine import Engine
from allinone.errors import BatchConflictError, InvalidInputError, MissingExtraError, OverloadedError, UnknownTaskError
from fixtures.fakes import FakeBackend

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TASK = 'name = "t"\nkind = "classify"\ninstructions.en = "Good or bad?"\n[[labels]]\nname = "good"\n[[labels]]\nname = "bad"\n'
PEOPLE = ('name = "people"\nkind = "extract"\ninstructions.en = "List the people."\n[output_schema]\ntype = "object"\n'
          'required = ["people"]\n[output_schema.properties.people]\ntype = "array"\nitems = { type = "string" }\n')
SRC = str(Path(__file__).resolve().parents[2] / "src")


class MarkBackend(FakeBackend):
    """Scores 'good' high when the prompt holds a '+', else 'bad': results differ by row."""

    def score_batch_hidden(self, requests, layers, *, relative=False, keep=True):
        self.batches.append(len(requests))
        self.prompts.extend(list(p) for p, _ in requests)
        out = []
        for prompt, conts in requests:
            plus = "+" in self.detokenize(prompt)
            out.append([(-0.1 if plus else -3.0) if self.detokenize(c) == "good" else (-3.0 if plus else -0.1)
                        for c in conts])
        return out, None


@pytest.fixture
def tasks_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "t.toml").write_text(TASK, encoding="utf-8")
    (folder / "people.toml").write_text(PEOPLE, encoding="utf-8")
    return folder


@pytest.fixture
def make(tasks_dir):
    made = []

    def build(backend=None, **settings) -> AllInOne:
        ai = AllInOne(Engine(backend or MarkBackend()), Settings(tasks_dir=tasks_dir, max_input_chars=60, **settings))
        made.append(ai)
        return ai

    yield build
    for ai in made:
        ai.close()


#: (id, text): good rows have a '+'; one empty text and one over max_input_chars (60)
ROWS = [(f"r{i}", f"row {i} {'+' if i % 3 == 0 else '-'}") for i in range(10)] + [("e1", ""), ("e2", "x" * 61)]


def write(path: Path, fmt: str, rows=ROWS, *, with_id: bool = True) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": t} if with_id else {"text": t}) + "\n" for i, t in rows),
                        encoding="utf-8")
    elif fmt == "csv":
        cols = {"id": [i for i, _ in rows], "text": [t for _, t in rows]} if with_id else {"text": [t for _, t in rows]}
        import pyarrow.csv as pcsv

        pcsv.write_csv(pa.table(cols), path)
    else:
        cols = {"id": [i for i, _ in rows], "text": [t for _, t in rows]} if with_id else {"text": [t for _, t in rows]}
        pq.write_table(pa.table(cols), path, row_group_size=5)
    return path


def read(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_labels(rows=ROWS) -> dict[str, str | None]:
    return {i: None if not t or len(t) > 60 else ("good" if "+" in t else "bad") for i, t in rows}


@pytest.mark.parametrize("out_fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("in_fmt", ["jsonl", "csv", "parquet"])
def test_every_input_format_gives_every_row_once_with_bad_rows_recorded(make, tmp_path, in_fmt, out_fmt):
    ai = make()
    src = write(tmp_path / f"in.{in_fmt}", in_fmt)
    out = tmp_path / f"out.{out_fmt}"
    summary = ai.batch("t", src, out, chunk_rows=4)
    rows = read(out)
    assert [r["id"] for r in rows] == [i for i, _ in ROWS]
    assert {r["id"]: r["label"] for r in rows} == expected_labels()
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert errors == {"e1": "text is empty", "e2": "text is 61 characters; the limit is 60"}
    assert all(r["scores"] is None for r in rows if r["error"])
    good = next(r for r in rows if r["id"] == "r0")
    assert set(good["scores"]) == {"good", "bad"} and good["scores"]["good"] > 0.9 and good["truncated"] is False
    assert (summary.rows, summary.rows_ok, summary.rows_failed, summary.rows_run) == (12, 10, 2, 12)
    assert summary.resumed_from == 0 and summary.rows_per_s > 0 and summary.peak_rss_mb > 10
    assert not (tmp_path / f"out.{out_fmt}.partial").exists()
    assert json.loads((tmp_path / f"out.{out_fmt}.progress.json").read_text())["complete"] is True


def test_unusable_jsonl_lines_are_rows_with_their_error(make, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"id": 7, "text": "a +"}\n'
                    b"not json\n"
                    b"\n   \n"  # blank lines are not rows
                    b'["a list"]\n'
                    b'{"id": "x", "body": "no text field"}\n'
                    b'{"text": 42}\n'
                    b'{"text": "caf\xe9 -"}\n'  # Latin-1, not UTF-8
                    b'{"id": null, "text": "last -"}')  # no newline at the end
    summary = make().batch("t", src, tmp_path / "out.jsonl")
    rows = read(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ["7", "1", "2", "x", "4", "5", "6"]  # the row number when there is no id
    assert [r["error"] for r in rows] == [
        None, "line 2: not valid JSON (Expecting value at column 1)", "line 5: not a JSON object", "no 'text' field",
        "'text' is int, not a string", "line 8: not UTF-8", None]
    assert rows[0]["label"] == "good" and rows[-1]["label"] == "bad"
    assert (summary.rows, summary.rows_ok, summary.rows_failed) == (7, 2, 5)


def test_fields_ids_and_formats(make, tmp_path):
    ai = make()
    # other field names; no id column: ids are row numbers; CSV ids stay text ("007")
    src = tmp_path / "in.csv"
    src.write_text('\ufeffkey,body\n007,"two\nlines +"\n,plain -\n', encoding="utf-8")
    ai.batch("t", src, tmp_path / "a.jsonl", text_field="body", id_field="key")
    rows = read(tmp_path / "a.jsonl")
    assert [(r["id"], r["label"]) for r in rows] == [("007", "good"), ("1", "bad")]
    ai.batch("t", write(tmp_path / "n.parquet", "parquet", with_id=False), tmp_path / "b.jsonl")
    assert [r["id"] for r in read(tmp_path / "b.jsonl")] == [str(i) for i in range(len(ROWS))]
    # an extension that says nothing: --format names it
    txt = tmp_path / "rows.txt"
    txt.write_text('{"text": "a +"}\n', encoding="utf-8")
    with pytest.raises(InvalidInputError, match="cannot tell the input format.*--format"):
        ai.batch("t", txt, tmp_path / "c.jsonl")
    assert ai.batch("t", txt, tmp_path / "c.jsonl", format="jsonl").rows_ok == 1
    with pytest.raises(InvalidInputError, match="has no column 'text'.*columns: key, body"):
        ai.batch("t", src, tmp_path / "d.jsonl")
    with pytest.raises(InvalidInputError, match="the output must|cannot tell the output format"):
        ai.batch("t", txt, tmp_path / "out.csv", format="jsonl")
    with pytest.raises(InvalidInputError, match="no such input file"):
        ai.batch("t", tmp_path / "missing.jsonl", tmp_path / "e.jsonl")
    twice = tmp_path / "twice.csv"
    twice.write_text("text,text\ngood,bad\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="2 columns named 'text'"):
        ai.batch("t", twice, tmp_path / "f.jsonl")
    assert not (tmp_path / "f.jsonl").exists()


def test_bad_parameters_and_unknown_tasks_fail_before_anything_is_written(make, tmp_path):
    ai = make()
    src = write(tmp_path / "in.jsonl", "jsonl")
    with pytest.raises(InvalidInputError, match="at least two"):
        ai.batch("t", src, tmp_path / "out.jsonl", labels=["good"])
    with pytest.raises(UnknownTaskError):
        ai.batch("nope", src, tmp_path / "out.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "tasks"]


def test_labels_given_as_a_parameter_name_the_score_columns(make, tmp_path):
    src = write(tmp_path / "in.jsonl", "jsonl")
    make().batch("t", src, tmp_path / "out.parquet", labels=["bad", "good", "meh"])
    schema = pq.read_schema(tmp_path / "out.parquet")
    assert schema.field("scores").type == pa.struct([("bad", pa.float64()), ("good", pa.float64()), ("meh", pa.float64())])


def test_columns_of_every_kind_hold_the_whole_result(make, tmp_path):
    ner_reply = '{"entities": [{"text": "Ann", "type": "PER"}]}'
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "Ann met Bob."}) + "\n", encoding="utf-8")
    for task, reply, params in [("t", "ok", {}), ("ner", ner_reply, {}), ("people", '{"people": ["Ann"]}', {}),
                                ("chat", "Hello there", {"max_tokens": 8})]:
        ai = make(MarkBackend(reply))
        out = tmp_path / f"{task}.parquet"
        ai.batch(task, src, out, **params)
        (row,) = read(out)
        result = ai.run(task, "Ann met Bob.", **params).to_dict()
        result.update(result.pop("data", {}))
        assert set(row) == {"id", "error", *result}, task  # every field of the result has its column
        assert {k: row[k] for k in result} == result, task
    schema = pq.read_schema(tmp_path / "ner.parquet")
    assert schema.field("entities").type == pa.list_(pa.struct(
        [("text", pa.string()), ("type", pa.string()), ("start", pa.int64()), ("end", pa.int64())]))
    assert pq.read_schema(tmp_path / "people.parquet").field("people").type == pa.list_(pa.string())
    assert pq.read_schema(tmp_path / "chat.parquet").field("text").type == pa.string()


def test_values_without_an_exact_type_are_written_as_json_text():
    assert arrow_type({"type": "object"}) is None and arrow_type({"type": ["string", "integer"]}) is None
    assert arrow_type({"type": ["number", "null"]}) == pa.float64()
    cols = Columns("extract", ("free", "n"), (("free", {"type": "object"}), ("n", {"type": "integer"})))
    assert cols.arrow_schema().field("free").type == pa.string()
    assert cols.to_arrow_row({"id": "0", "free": {"a": [1]}, "n": 3, "error": None})["free"] == '{"a": [1]}'


def test_a_machine_error_stops_the_job_instead_of_marking_the_row(tmp_path):
    class Busy:
        def run_many(self, task, texts, **params):
            return [OverloadedError("too many requests waiting")] * len(texts)

    src = write(tmp_path / "in.jsonl", "jsonl")
    job = Job("t", {}, Columns("classify", ("label",), (("label", {"type": "string"}),)), Source.open(src))
    with pytest.raises(OverloadedError):
        label_chunk(Busy(), job, next(job.source.chunks(0, 4)))


# -- resuming ---------------------------------------------------------------------------------
class Stop(Exception):
    pass


def stop_after(rows: int):
    def progress(done, total):
        if done >= rows:
            raise Stop  # as a kill right after a commit
    return progress


@pytest.mark.parametrize("out_fmt", ["jsonl", "parquet"])
def test_a_crashed_job_resumes_without_redoing_rows_and_drops_a_torn_tail(make, tmp_path, out_fmt):
    src = write(tmp_path / "in.jsonl", "jsonl")
    out = tmp_path / f"out.{out_fmt}"
    first = MarkBackend()
    with pytest.raises(Stop):
        make(first).batch("t", src, out, chunk_rows=4, progress=stop_after(8))
    assert not out.exists()  # the output appears only when every row is in
    manifest = json.loads((tmp_path / f"out.{out_fmt}.progress.json").read_text())
    assert (manifest["rows"], manifest["complete"]) == (8, False)
    with (tmp_path / f"out.{out_fmt}.partial").open("ab") as fh:
        fh.write(b'{"id": "r8", "label": "half a chunk wri')  # written, never acknowledged
    second = MarkBackend()
    summary = make(second).batch("t", src, out, chunk_rows=4)
    rows = read(out)
    assert [r["id"] for r in rows] == [i for i, _ in ROWS]  # each row once, in order
    assert {r["id"]: r["label"] for r in rows} == expected_labels()
    assert (summary.resumed_from, summary.rows_run, summary.rows, summary.rows_ok, summary.rows_failed) == (8, 4, 12, 10, 2)
    assert sum(first.batches) == 8 and sum(second.batches) == 2  # rows 8-11, of which 2 are bad: nothing redone
    again = make(MarkBackend()).batch("t", src, out, chunk_rows=4)  # finished: left as it is
    assert (again.rows_run, again.rows) == (0, 12) and read(out) == rows


def test_a_changed_input_task_or_parameters_is_refused_unless_restarted(make, tmp_path, tasks_dir):
    src = write(tmp_path / "in.jsonl", "jsonl")
    out = tmp_path / "out.jsonl"
    with pytest.raises(Stop):
        make().batch("t", src, out, chunk_rows=4, progress=stop_after(4))
    with pytest.raises(BatchConflictError, match="another task parameters"):
        make().batch("t", src, out, chunk_rows=4, labels=["good", "bad", "meh"])
    (tasks_dir / "t.toml").write_text(TASK.replace("Good or bad?", "Good or bad, really?"), encoding="utf-8")
    with pytest.raises(BatchConflictError, match="another task declaration"):
        make().batch("t", src, out, chunk_rows=4)
    (tasks_dir / "t.toml").write_text(TASK, encoding="utf-8")
    with src.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "new", "text": "one more +"}) + "\n")
    with pytest.raises(BatchConflictError, match="another input file .changed since it started.; use --restart"):
        make().batch("t", src, out, chunk_rows=4)
    summary = make().batch("t", src, out, chunk_rows=4, restart=True)
    assert (summary.resumed_from, summary.rows) == (0, 13)
    assert read(out)[-1]["id"] == "new"


def test_an_output_not_written_by_a_job_is_not_overwritten(make, tmp_path):
    src = write(tmp_path / "in.jsonl", "jsonl")
    out = tmp_path / "results.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    with pytest.raises(BatchConflictError, match="exists and no batch job's manifest"):
        make().batch("t", src, out)
    assert out.read_text() == "precious\n"
    assert make().batch("t", src, out, restart=True).rows == len(ROWS)


def test_parquet_without_pyarrow_names_the_extra(make, tmp_path, monkeypatch):
    src = write(tmp_path / "in.jsonl", "jsonl")
    csv = write(tmp_path / "in.csv", "csv")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    ai = make()
    with pytest.raises(MissingExtraError, match=r"writing Parquet needs pyarrow: pip install 'allinone\[batch\]'"):
        ai.batch("t", src, tmp_path / "out.parquet")
    with pytest.raises(MissingExtraError, match=r"reading CSV needs pyarrow"):
        ai.batch("t", csv, tmp_path / "out.jsonl")
    assert ai.batch("t", src, tmp_path / "out.jsonl").rows == len(ROWS)  # JSONL needs nothing


def test_ray_without_the_extra_names_it(tmp_path, tasks_dir):
    src = write(tmp_path / "in.jsonl", "jsonl")
    code = "import sys; sys.modules['ray'] = None; from allinone.cli import app; app()"
    proc = subprocess.run([sys.executable, "-c", code, "batch", "t", "--input", str(src), "--output",
                           str(tmp_path / "out.jsonl"), "--tasks-dir", str(tasks_dir), "--ray"],
                          capture_output=True, text=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "--ray needs Ray Data: pip install 'allinone[ray]'" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_second_run_of_the_same_job_at_once_is_refused(make, tmp_path):
    src = write(tmp_path / "in.jsonl", "jsonl")
    out = tmp_path / "out.jsonl"
    seen = []

    def meanwhile(done, total):
        if done == 4 and not seen:  # the first run holds the job: a second one must not touch it
            with pytest.raises(BatchConflictError, match="another process is running the job"):
                make().batch("t", src, out, chunk_rows=4)
            seen.append(done)

    summary = make().batch("t", src, out, chunk_rows=4, progress=meanwhile)
    assert seen == [4] and summary.rows == len(ROWS) and [r["id"] for r in read(out)] == [i for i, _ in ROWS]
    assert not (tmp_path / "out.jsonl.lock").exists()  # the finished job lets it go


def test_the_output_may_not_be_the_input(make, tmp_path):
    src = write(tmp_path / "in.jsonl", "jsonl")
    with pytest.raises(InvalidInputError, match="would overwrite the input"):
        make().batch("t", src, src, restart=True)
    assert len(read(src)) == len(ROWS)


def test_a_csv_that_is_not_csv_is_a_clear_error(make, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,text\n1,fine\n2,too,many,fields\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"in\.csv: cannot read it as CSV: .*Expected 2 columns, got 4"):
        make().batch("t", src, tmp_path / "out.jsonl")
