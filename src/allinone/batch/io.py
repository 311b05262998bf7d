"""A batch job's files: its input read in chunks, its output written so that a killed job loses
nothing it acknowledged.

Input (:class:`Source`): JSONL (one JSON object a line; blank lines are not rows), CSV (a header
row, then rows; read with pyarrow) or Parquet (pyarrow). Every row gets a number, from 0 in file
order, and an id: the ``id_field``'s value as text, or the row number when the row has none. A row
that cannot be used (a line that is not JSON, no text field, a text that is not a string) is kept
with its error, never dropped. Only a file that cannot be read as its format at all (a CSV row
with the wrong number of fields, a Parquet file that is not one) stops the job.

Output (:class:`Output`): rows are appended to a staging file (JSON lines, ``<output>.partial``)
one committed chunk at a time (write, flush, fsync), and only then does a small manifest
(``<output>.progress.json``, replaced atomically) count them. A restart cuts the staging file back
to what the manifest counts, so a half-written chunk is never kept. The final file (``<output>``,
JSONL or Parquet) appears only when every row is in: JSONL by renaming the staging file, Parquet
by converting it in slices (memory stays flat). While a job runs it holds ``<output>.lock``, so
the same command started twice at once cannot write the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BatchConflictError, InvalidInputError, MissingExtraError

INPUT_FORMATS = ("jsonl", "csv", "parquet")
OUTPUT_FORMATS = ("jsonl", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
#: rows per slice when converting the staging file to Parquet (one row group each)
PARQUET_ROWS = 50_000


def require_pyarrow(what: str) -> Any:
    """The ``pyarrow`` module, or an error naming the extra that brings it.

    Raises:
        MissingExtraError: pyarrow is not installed.
    """
    try:
        import pyarrow
        import pyarrow.csv  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"{what} needs pyarrow: pip install 'allinone[batch]'") from None
    return pyarrow


def format_of(path: Path, given: str | None, allowed: tuple[str, ...], what: str) -> str:
    """The file format: ``given``, else from the extension.

    Raises:
        InvalidInputError: an unknown format, or an extension that says none.
    """
    fmt = given.lower() if given else _EXTENSIONS.get(path.suffix.lower())
    if fmt in allowed:
        return fmt
    param = "format" if what == "input" else "output"
    if given:
        raise InvalidInputError(f"the {what} format must be one of {', '.join(allowed)}, got {given!r}", param=param)
    known = ", ".join(ext for ext, f in _EXTENSIONS.items() if f in allowed)
    hint = f"; name it with --format ({', '.join(allowed)})" if what == "input" else ""
    raise InvalidInputError(f"cannot tell the {what} format of {path} from its extension ({known}){hint}", param=param)


def id_text(value: Any) -> str | None:
    """A row id as text: strings as they are, other values as JSON (``7`` -> ``"7"``); ``None``
    and ``""`` mean the row has no id."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


@dataclass
class Chunk:
    """Consecutive input rows, parsed: row ``start + i`` has ``ids[i]`` and either ``texts[i]``
    or ``errors[i]`` (why it cannot be used)."""

    start: int
    ids: list[str] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, row_id: Any, text: Any, error: str | None, field_name: str) -> None:
        if error is None:
            if text is None:
                error = f"no {field_name!r} field"
            elif not isinstance(text, str):
                error = f"{field_name!r} is {type(text).__name__}, not a string"
        number = self.start + len(self.ids)
        self.ids.append(id_text(row_id) or str(number))
        self.texts.append(text if error is None else None)
        self.errors.append(error)


@dataclass(frozen=True)
class InputStats:
    """What identifies an input file's content: size in bytes, SHA-256, number of rows."""

    size: int
    sha256: str
    rows: int


def check_chunk_rows(rows: int) -> None:
    """Raises InvalidInputError unless ``rows`` (rows per committed chunk) is an int >= 1."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise InvalidInputError(f"chunk rows must be an integer >= 1, got {rows!r}", param="chunk_rows")


@dataclass(frozen=True)
class Source:
    """An input file and how to read it. Build it with :meth:`open`."""

    path: Path
    format: str
    text_field: str = "text"
    id_field: str = "id"
    #: CSV/Parquet: the file has the id column (JSONL rows are looked at one by one)
    has_id: bool = True

    @classmethod
    def open(cls, path: str | Path, format: str | None = None, *, text_field: str = "text",
             id_field: str = "id") -> "Source":
        """Check the input can be read: it exists, its format is known, the library is there,
        and a CSV header or Parquet schema has the text column.

        Raises:
            InvalidInputError: no such file, an unknown format, no text column.
            MissingExtraError: CSV or Parquet without pyarrow.
        """
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"no such input file: {path}", param="input")
        fmt = format_of(path, format, INPUT_FORMATS, "input")
        if not text_field:
            raise InvalidInputError("the text field's name is empty", param="text_field")
        if fmt == "jsonl":
            return cls(path, fmt, text_field, id_field)
        require_pyarrow(f"reading {fmt.upper()}")
        columns = _csv_header(path) if fmt == "csv" else _parquet_columns(path)
        if text_field not in columns:
            raise InvalidInputError(f"{path} has no column {text_field!r} (columns: {', '.join(columns) or 'none'}); "
                                    "name the text column with --text-field", param="text_field")
        for name, param in ((text_field, "text_field"), (id_field, "id_field")):
            if list(columns).count(name) > 1:  # which one is meant cannot be known
                raise InvalidInputError(f"{path} has {list(columns).count(name)} columns named {name!r}; "
                                        "rename them or choose another with --" + param.replace("_", "-"), param=param)
        return cls(path, fmt, text_field, id_field, has_id=bool(id_field) and id_field in columns)

    def scan(self) -> InputStats:
        """One pass over the file: its size, SHA-256 and number of rows."""
        digest = hashlib.sha256()
        size = rows = 0
        with self.path.open("rb") as fh:
            if self.format == "jsonl":
                for line in fh:
                    digest.update(line)
                    size += len(line)
                    rows += bool(line.strip())
                return InputStats(size, digest.hexdigest(), rows)
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
        with self._readable():
            if self.format == "parquet":
                import pyarrow.parquet as pq

                rows = pq.ParquetFile(self.path).metadata.num_rows
            else:
                rows = sum(batch.num_rows for batch in self._csv_batches(columns=[self.text_field]))
        return InputStats(size, digest.hexdigest(), rows)

    @contextmanager
    def _readable(self) -> Iterator[None]:
        """pyarrow's errors on a file that is not its format, as the caller's error naming the file."""
        import pyarrow as pa

        try:
            yield
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidInputError(f"{self.path}: cannot read it as {self.format.upper()}: {exc}", param="input") from None

    def chunks(self, start: int = 0, rows: int = 256) -> Iterator[Chunk]:
        """The rows from number ``start`` on, ``rows`` at a time (the last chunk may be shorter).

        Raises:
            InvalidInputError: the file cannot be read as its format (e.g. a CSV row with the
                wrong number of fields), naming the file.
        """
        check_chunk_rows(rows)
        if self.format == "jsonl":
            yield from self._jsonl_chunks(start, rows)
            return
        with self._readable():
            yield from self._table_chunks(start, rows)

    # -- JSONL ----------------------------------------------------------------------------
    def _jsonl_chunks(self, start: int, rows: int) -> Iterator[Chunk]:
        chunk = Chunk(start)
        number = 0
        with self.path.open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                number += 1
                if number <= start:
                    continue
                chunk.add(*self.parse_line(line, lineno), self.text_field)
                if len(chunk) == rows:
                    yield chunk
                    chunk = Chunk(chunk.start + rows)
        if len(chunk):
            yield chunk

    def parse_line(self, line: bytes, lineno: int) -> tuple[Any, Any, str | None]:
        """(id value, text value, error) of one JSONL line."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return None, None, f"line {lineno}: not UTF-8"
        try:
            row = json.loads(text.lstrip("\ufeff") if lineno == 1 else text)
        except json.JSONDecodeError as exc:
            return None, None, f"line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
        if not isinstance(row, dict):
            return None, None, f"line {lineno}: not a JSON object"
        return row.get(self.id_field) if self.id_field else None, row.get(self.text_field), None

    # -- CSV and Parquet ------------------------------------------------------------------
    def _columns(self) -> list[str]:
        return [self.text_field] + ([self.id_field] if self.has_id else [])

    def _csv_batches(self, columns: list[str]) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        reader = pcsv.open_csv(
            self.path, read_options=pcsv.ReadOptions(use_threads=False, block_size=1 << 20),
            # a quoted field may hold line breaks; every value stays text (an id "007" stays "007")
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(include_columns=columns, column_types=dict.fromkeys(columns, pa.string())))
        yield from reader

    def _table_chunks(self, start: int, rows: int) -> Iterator[Chunk]:
        columns = self._columns()
        if self.format == "csv":
            batches = self._csv_batches(columns)
            skip = start
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.path, buffer_size=1 << 20)  # buffered: a large row group is streamed
            first, before = 0, 0
            while first < pf.num_row_groups and before + pf.metadata.row_group(first).num_rows <= start:
                before += pf.metadata.row_group(first).num_rows
                first += 1
            batches = pf.iter_batches(batch_size=max(rows, 1024), columns=columns,
                                      row_groups=list(range(first, pf.num_row_groups)))
            skip = start - before
        chunk = Chunk(start)
        for batch in batches:
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch = batch.slice(skip)
            skip = 0
            texts = batch.column(self.text_field).to_pylist()
            ids = batch.column(self.id_field).to_pylist() if self.has_id else [None] * len(texts)
            for row_id, text in zip(ids, texts):
                chunk.add(row_id, text, None, self.text_field)
                if len(chunk) == rows:
                    yield chunk
                    chunk = Chunk(chunk.start + rows)
        if len(chunk):
            yield chunk


def _csv_header(path: Path) -> list[str]:
    import csv

    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            return next(csv.reader(fh), [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{path}: cannot read its CSV header: {exc}", param="input") from None


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInputError(f"{path}: not a Parquet file: {exc}", param="input") from None


# -- output ---------------------------------------------------------------------------------
@dataclass
class State:
    """What the manifest says is committed: rows (a prefix of the input), of which ``ok`` have a
    result and ``failed`` an error; ``complete``: every input row is in."""

    rows: int = 0
    ok: int = 0
    failed: int = 0
    complete: bool = False
    seconds: float = 0.0


class Output:
    """The output of one job (see the module docstring): the final file, its staging file, its
    manifest and its lock. ``begin`` takes the lock and checks the job against the manifest,
    ``commit`` appends a chunk, ``finish`` writes the final file, ``close`` lets go of the lock."""

    def __init__(self, path: str | Path, format: str | None = None) -> None:
        self.path = Path(path)
        self.format = format_of(self.path, format, OUTPUT_FORMATS, "output")
        if self.format == "parquet":
            require_pyarrow("writing Parquet")
        self.staging = self.path.with_name(self.path.name + ".partial")
        self.manifest = self.path.with_name(self.path.name + ".progress.json")
        self.lock = self.path.with_name(self.path.name + ".lock")
        self._job: dict[str, Any] = {}
        self._state = State()
        self._bytes = 0
        self._fh: Any = None
        self._lock_fd: int | None = None

    def check_input(self, path: Path) -> None:
        """Raises: InvalidInputError: one of the output's files is the input file."""
        here = path.resolve()
        for p in (self.path, self.staging, self.manifest, self.lock):
            if p.resolve() == here:
                raise InvalidInputError(f"the output {self.path} would overwrite the input {path}", param="output")

    def begin(self, job: dict[str, Any], *, restart: bool = False) -> State:
        """Start the job, or pick it up where the manifest says it stopped.

        Args:
            job: what identifies the job (input fingerprint, task, parameters, model...): JSON data.
            restart: drop any earlier output of this path and start over.

        Returns:
            The committed state (all zero for a new job).

        Raises:
            BatchConflictError: the manifest belongs to another job (naming what changed), or the
                output exists without a manifest, unless ``restart``; or another process runs
                the job now.
        """
        job = json.loads(json.dumps(job, sort_keys=True, default=str))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            return self._begin(job, restart)
        except BaseException:
            self.close()
            raise

    def _acquire(self) -> None:
        """Hold ``<output>.lock`` for the job's life: a second run of the same job at the same
        time would cut the staging file under the first."""
        import fcntl

        fd = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BatchConflictError(f"another process is running the job of {self.path} (it holds "
                                     f"{self.lock.name}); wait for it or stop it") from None
        self._lock_fd = fd

    def _begin(self, job: dict[str, Any], restart: bool) -> State:
        if restart:
            for p in (self.path, self.staging, self.manifest):
                p.unlink(missing_ok=True)
        saved = self._read_manifest()
        if saved is None:
            if self.path.exists() or self.staging.exists():
                raise BatchConflictError(f"{self.path} exists and no batch job's manifest ({self.manifest.name}) is "
                                         "next to it; use --restart to overwrite it")
            self._job, self._state, self._bytes = job, State(), 0
            self.staging.write_bytes(b"")
            self._write_manifest()
            return State()
        changed = _changed(job, saved["job"])
        if changed:
            raise BatchConflictError(f"{self.path} belongs to a job with another {', '.join(changed)} (changed "
                                     "since it started); use --restart to start over")
        self._job, self._bytes = job, saved["bytes"]
        self._state = State(saved["rows"], saved["ok"], saved["failed"], saved["complete"], saved.get("seconds", 0.0))
        if not self._state.complete or self.staging.exists():
            size = self.staging.stat().st_size if self.staging.exists() else -1
            if size < self._bytes:
                raise BatchConflictError(f"{self.staging} is missing or shorter than {self.manifest.name} says; "
                                         "use --restart to start over")
            if size > self._bytes:
                os.truncate(self.staging, self._bytes)  # a chunk written but never acknowledged
        return State(**vars(self._state))

    def commit(self, lines: list[str], ok: int, failed: int, seconds: float = 0.0) -> None:
        """Append one chunk of rows (JSON lines, without newlines) and count them; when this
        returns they survive a kill. ``seconds``: compute time to add to the job's total."""
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        if self._fh is None:
            self._fh = self.staging.open("ab")
        self._fh.write(data)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._bytes += len(data)
        s = self._state
        s.rows, s.ok, s.failed, s.seconds = s.rows + len(lines), s.ok + ok, s.failed + failed, s.seconds + seconds
        self._write_manifest()

    def finish(self, columns: Any) -> State:
        """Mark every row in and write the final file (again if a kill interrupted it before).

        Args:
            columns: the job's :class:`~allinone.batch.columns.Columns` (the Parquet schema).
        """
        self._close_staging()
        self._state.complete = True
        self._write_manifest()
        if self.staging.exists():
            if self.format == "jsonl":
                os.replace(self.staging, self.path)
            else:
                tmp = self.path.with_name(self.path.name + ".tmp")
                write_parquet(self.staging, tmp, columns)
                os.replace(tmp, self.path)
                self.staging.unlink()
            _fsync_dir(self.path.parent)
        return State(**vars(self._state))

    def close(self) -> None:
        """Close the staging file and let go of the lock (removed once the job is complete)."""
        self._close_staging()
        if self._lock_fd is not None:
            if self._state.complete:
                self.lock.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _close_staging(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest.exists():
            return None
        try:
            saved = json.loads(self.manifest.read_text(encoding="utf-8"))
            if saved.get("version") != 1 or not isinstance(saved.get("job"), dict):
                raise ValueError("unknown manifest version")
            return saved
        except (OSError, ValueError, KeyError) as exc:
            raise BatchConflictError(f"cannot read {self.manifest} ({exc}); use --restart to start over") from None

    def _write_manifest(self) -> None:
        s = self._state
        body = {"version": 1, "output": str(self.path), "format": self.format, "rows": s.rows, "ok": s.ok,
                "failed": s.failed, "bytes": self._bytes, "complete": s.complete, "seconds": round(s.seconds, 3),
                "job": self._job}
        tmp = self.manifest.with_name(self.manifest.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(body, fh, ensure_ascii=False, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.manifest)
        _fsync_dir(self.manifest.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a crash of the machine, not only of the process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_parquet(staging: Path, target: Path, columns: Any) -> None:
    """Convert the staging JSON lines to one Parquet file with ``columns``' schema,
    :data:`PARQUET_ROWS` rows at a time (one row group each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = columns.arrow_schema()
    with pq.ParquetWriter(target, schema) as writer, staging.open("rb") as fh:
        rows: list[dict[str, Any]] = []
        for line in fh:
            rows.append(columns.to_arrow_row(json.loads(line)))
            if len(rows) == PARQUET_ROWS:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))


#: how a refused rerun names what differs, by (part of the job, key in it)
_CHANGE_NAMES = {("task", "name"): "task", ("task", "declaration"): "task declaration",
                 ("task", "learned"): "learned artifact (a fit, a reset, or learned on/off)",
                 ("model", "model"): "model"}


def _changed(job: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """What differs between a job and the one an output was started with, in words."""
    out: list[str] = []
    for part in sorted(set(job) | set(saved)):
        now, then = job.get(part), saved.get(part)
        if now == then:
            continue
        if part == "input":
            out.append("input file")
        elif part == "params":
            out.append("task parameters")
        elif isinstance(now, dict) and isinstance(then, dict):
            keys = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
            out += [_CHANGE_NAMES.get((part, k), f"setting {k}" if part == "model" else f"{part} {k}") for k in keys]
        else:
            out.append(part)
    return out
