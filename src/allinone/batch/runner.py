"""The resumable batch job: every row of a file through one task, a chunk at a time.

Each chunk's texts go to ``AllInOne.run_many`` together, so the engine micro-batches them; each
chunk's rows are then committed to the output (:class:`~allinone.batch.io.Output`) before the next
chunk is read. A killed job is run again with the same call: it checks that the input, task,
parameters and model are the ones the output was started with, cuts off any chunk that was not
committed, and goes on from the first row not committed. :func:`label_chunk` is the one function
that turns a chunk into output rows, here and on Ray actors (:mod:`allinone.batch.ray`), so both
give the same rows.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AllInOneError, BatchConflictError
from .columns import ERROR, Columns
from .io import Chunk, InputStats, Output, Source, State, check_chunk_rows

if TYPE_CHECKING:
    from ..api import AllInOne
    from ..settings import Settings
    from ..tasks import TaskSpec

#: rows per chunk: texts submitted together, and the most work a kill can lose
DEFAULT_CHUNK_ROWS = 256

Progress = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class Job:
    """What every worker of a job needs (plain data: it travels to Ray actors)."""

    task: str
    params: Mapping[str, Any]
    columns: Columns
    source: Source
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self) -> None:  # before anything is written
        check_chunk_rows(self.chunk_rows)


@dataclass(frozen=True)
class BatchSummary:
    """How a batch job went.

    Attributes:
        rows: rows in the output (every input row, once); ``rows_ok`` have a result,
            ``rows_failed`` an error (over the whole job, earlier runs included).
        rows_run: rows computed by this run; ``resumed_from``: rows an earlier run had committed.
        elapsed_s: this run's wall time in seconds (model loading not included for a local run;
            included for Ray, whose actors load it); ``rows_per_s``: ``rows_run / elapsed_s``.
        peak_rss_mb: this process's peak resident memory in MB (VmHWM); for Ray, the driver's,
            and ``actor_peak_rss_mb`` the largest of the actors'.
        actors / nodes: Ray only: the actors of the pool, and the nodes whose actors labelled
            chunks in this run.
    """

    task: str
    input: str
    output: str
    rows: int
    rows_ok: int
    rows_failed: int
    rows_run: int
    resumed_from: int
    elapsed_s: float
    rows_per_s: float
    peak_rss_mb: float
    actors: int | None = None
    actor_peak_rss_mb: float | None = None
    nodes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.actors is None:
            del out["actors"], out["actor_peak_rss_mb"], out["nodes"]
        return out


def label_chunk(ai: "AllInOne", job: Job, chunk: Chunk) -> list[dict[str, Any]]:
    """The output rows of one chunk, in order: each row's result, or its error.

    A row's error is recorded when the row cannot be used (see :class:`~allinone.batch.io.Chunk`)
    or the task refuses its text (empty, over ``max_input_chars``, a prompt that cannot fit: the
    4xx errors). Any other error stops the job: it is the machine's, not the row's, and a rerun
    should compute that row again.

    Raises:
        AllInOneError: a 5xx error of any row (overloaded, backend failure...).
    """
    todo = [i for i, error in enumerate(chunk.errors) if error is None]
    results = ai.run_many(job.task, [chunk.texts[i] for i in todo], timeout=None, **job.params) if todo else []
    found = dict(zip(todo, results))
    rows = []
    for i, row_id in enumerate(chunk.ids):
        result = found.get(i)
        if result is None:
            rows.append(job.columns.row(row_id, error=chunk.errors[i]))
        elif isinstance(result, AllInOneError):
            if result.status_code >= 500:
                raise result
            rows.append(job.columns.row(row_id, error=result.message))
        else:
            rows.append(job.columns.row(row_id, result))
    return rows


def encode(rows: list[dict[str, Any]]) -> tuple[list[str], int, int]:
    """Output rows as JSON lines, and how many have a result and how many an error."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    failed = sum(row[ERROR] is not None for row in rows)
    return lines, len(rows) - failed, failed


def job_identity(job: Job, stats: InputStats, *, spec: "TaskSpec", learned: Mapping[str, Any] | None,
                 model: str, settings: "Settings") -> dict[str, Any]:
    """What an output is tied to: the input's content, the task's declaration and what it
    learned, the parameters, the model and the settings that change results. A rerun of the
    job must match it (the input's path may change, its content may not)."""
    src = job.source
    return {
        "input": {"sha256": stats.sha256, "size": stats.size, "rows": stats.rows, "format": src.format,
                  "text_field": src.text_field, "id_field": src.id_field},
        "task": {"name": job.task, "declaration": spec.model_dump(mode="json"), "learned": _learned(learned)},
        "params": dict(job.params),
        "model": {"model": model, "backend": settings.backend, "dtype": settings.dtype, "n_ctx": settings.n_ctx,
                  "max_input_tokens": settings.max_input_tokens, "max_input_chars": settings.max_input_chars},
    }


def _learned(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a task learned, by content: its summary (method, data, figures) and the SHA-256 of
    the artifact file (its place may differ between machines, its weights may not)."""
    if not summary:
        return None
    out = {k: v for k, v in summary.items() if k != "path"}
    if summary.get("path"):
        out["sha256"] = hashlib.sha256(Path(summary["path"]).read_bytes()).hexdigest()
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_batch(ai: "AllInOne", task: str, input: str | Path, output: str | Path, *, format: str | None = None,
              text_field: str = "text", id_field: str = "id", restart: bool = False,
              chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: Progress | None = None, **params: Any) -> BatchSummary:
    """Run ``task`` on every row of ``input`` and write ``output``; see :meth:`AllInOne.batch`."""
    started = time.perf_counter()
    source = Source.open(input, format, text_field=text_field, id_field=id_field)
    out = Output(output)
    out.check_input(source.path)
    ai.run_many(task, [], **params)  # an unknown task or bad parameters fail before the input is read
    description = ai.describe_task(task)
    job = Job(task, dict(params), Columns.for_task(description, params), source, chunk_rows)
    stats = source.scan()
    identity = job_identity(job, stats, spec=ai.tasks.get(task), learned=description.get("learned"),
                            model=ai.model_sha256 or ai.model_id, settings=ai.settings)
    state = out.begin(identity, restart=restart)
    chunks = (encode(label_chunk(ai, job, chunk)) for chunk in source.chunks(state.rows, chunk_rows))
    return drive(job, out, state, stats.rows, chunks, progress=progress, started=started)


def drive(job: Job, out: Output, state: State, total: int, chunks: Iterable[tuple[list[str], int, int]], *,
          progress: Progress | None, started: float, **extra: Any) -> BatchSummary:
    """Commit every chunk of ``chunks`` (JSON lines, ok, failed) after ``state``, then write the
    final file; the loop shared by the local run and Ray's driver."""
    report = progress or (lambda done, total: None)
    resumed = state.rows
    try:
        if not state.complete:
            report(state.rows, total)
            tick = time.perf_counter()
            done = state.rows
            for lines, ok, failed in chunks:
                now = time.perf_counter()
                out.commit(lines, ok, failed, seconds=now - tick)
                tick = now
                done += len(lines)
                report(done, total)
            if done != total:
                raise BatchConflictError(f"{job.source.path} had {total} rows when the job started and {done} "
                                         "when it ended: it changed while the job ran; use --restart")
        final = out.finish(job.columns)
    finally:
        out.close()
    elapsed = time.perf_counter() - started
    ran = final.rows - resumed if not state.complete else 0
    return BatchSummary(task=job.task, input=str(job.source.path), output=str(out.path), rows=final.rows,
                        rows_ok=final.ok, rows_failed=final.failed, rows_run=ran, resumed_from=resumed,
                        elapsed_s=round(elapsed, 3), rows_per_s=round(ran / elapsed, 3) if elapsed > 0 else 0.0,
                        peak_rss_mb=peak_rss_mb(), **extra)
