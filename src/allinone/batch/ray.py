"""The same batch job on a Ray cluster, with Ray Data (the ``ray`` extra).

The input is read as a Ray dataset, by a datasource over the very reader the local run uses
(:meth:`~allinone.batch.io.Source.chunks`), one chunk per dataset row, on the driver's node (so
the input file need only be there). ``map_batches`` sends the chunks to a pool of actors; each
actor loads the model once (its threads set from the CPUs it holds) and labels a chunk with
:func:`~allinone.batch.runner.label_chunk`, the local run's function. The labelled chunks come
back to the driver in input order and are committed by the local run's writer
(:class:`~allinone.batch.io.Output`), so the output has the same rows, the same manifest, and
resumes the same way (an interrupted Ray job, or a local one, can be finished by either).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import AllInOneError, InvalidInputError, MissingExtraError
from ..settings import Settings
from .columns import ERROR, Columns
from .io import Chunk, Output, Source
from .runner import (
    DEFAULT_CHUNK_ROWS,
    BatchSummary,
    Job,
    Progress,
    drive,
    encode,
    job_identity,
    label_chunk,
    peak_rss_mb,
)

try:  # the extra is optional: without it this module still imports, and run_on_ray says what is missing
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata
except ImportError:  # pragma: no cover - exercised by the test that hides ray
    ray = None
    Datasource = object

NO_RAY = "--ray needs Ray Data: pip install 'allinone[ray]'"


def require_ray() -> None:
    """Raises: MissingExtraError: Ray Data is not installed (the message names the extra)."""
    if ray is None:
        raise MissingExtraError(NO_RAY)


def chunk_table(chunk: Chunk) -> Any:
    """A parsed chunk as a one-row Arrow table: start, ids, texts, errors (lists)."""
    import pyarrow as pa

    strings = pa.list_(pa.string())
    return pa.table({"start": pa.array([chunk.start], pa.int64()), "ids": pa.array([chunk.ids], strings),
                     "texts": pa.array([chunk.texts], strings), "errors": pa.array([chunk.errors], strings)})


def table_chunks(table: Any) -> list[Chunk]:
    """The chunks of a table of :func:`chunk_table` rows."""
    return [Chunk(row["start"], row["ids"], row["texts"], row["errors"]) for row in table.to_pylist()]


class InputDatasource(Datasource):
    """The job's input from row ``start`` on, read by one task on the driver's node. Each
    dataset row is a whole chunk of ``chunk_rows`` parsed input rows: however Ray shapes its
    blocks, an actor then labels exactly the chunks the local run labels, so the engine batches
    the same texts together and the results are the same to the last bit."""

    def __init__(self, source: Source, start: int, chunk_rows: int, rows: int, size: int) -> None:
        super().__init__()
        self.source, self.start, self.chunk_rows, self.rows, self.size = source, start, chunk_rows, rows, size

    def estimate_inmemory_data_size(self) -> int | None:
        return self.size

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        source, start, chunk_rows = self.source, self.start, self.chunk_rows

        def read() -> Iterator[Any]:
            for chunk in source.chunks(start, chunk_rows):
                yield chunk_table(chunk)

        meta = BlockMetadata(num_rows=-(-(self.rows - start) // chunk_rows), size_bytes=self.size, exec_stats=None,
                             input_files=[str(source.path)])
        return [ReadTask(read, meta)]

    @property
    def supports_distributed_reads(self) -> bool:
        return False  # the input is a file on the driver's machine


class Labeler:
    """A Ray actor of the pool: loads the model once, then labels the chunks of each batch it
    is given (one, with ``batch_size=1``)."""

    def __init__(self, loader: Callable[[Settings], Any], settings: Mapping[str, Any], job: Job) -> None:
        options = dict(settings)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if options.get("n_threads") is None and cpus:
            options["n_threads"] = max(1, int(cpus))
        options["request_timeout"] = None  # a block waits for its rows however long the queue
        self.ai = loader(Settings(**options))
        self.job = job
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        starts, lines, failed = [], [], []
        for chunk in table_chunks(table):
            rows = label_chunk(self.ai, self.job, chunk)
            starts.append(chunk.start)
            lines.append(encode(rows)[0])
            failed.append(sum(row[ERROR] is not None for row in rows))
        return pa.table({"start": pa.array(starts, pa.int64()), "lines": pa.array(lines, pa.list_(pa.string())),
                         "failed": pa.array(failed, pa.int64()),
                         "rss_mb": pa.array([peak_rss_mb()] * len(starts), pa.float64()),
                         "node": pa.array([self.node] * len(starts), pa.string())})


def run_on_ray(task: str, input: str | Path, output: str | Path, *, settings: Settings,
               loader: Callable[[Settings], Any], params: Mapping[str, Any] | None = None,
               address: str | None = None, actors: int | None = None, cpus_per_actor: float = 1,
               format: str | None = None, text_field: str = "text", id_field: str = "id", restart: bool = False,
               chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: Progress | None = None) -> BatchSummary:
    """Run a batch job on a Ray cluster; see :meth:`AllInOne.batch_on_ray`.

    Raises:
        MissingExtraError: Ray Data is not installed.
        UnknownTaskError / InvalidInputError / BatchConflictError: as for a local run, before
            the cluster is used.
        AllInOneError: an actor failed (the message says why); committed rows are kept.
    """
    require_ray()
    from ..learn.artifacts import ArtifactStore
    from ..models import default_cache_dir, resolve_model
    from ..tasks import Limits, TaskRegistry, kind_of

    started = time.perf_counter()
    params = dict(params or {})
    if actors is not None and actors < 1:
        raise InvalidInputError("actors must be at least 1", param="actors")
    if cpus_per_actor <= 0:
        raise InvalidInputError("cpus per actor must be more than 0", param="cpus_per_actor")
    source = Source.open(input, format, text_field=text_field, id_field=id_field)
    out = Output(output)
    out.check_input(source.path)
    registry = TaskRegistry(tasks_dir=settings.tasks_dir)
    spec = registry.get(task)
    kind_of(spec).request(spec, "x", params, Limits(max_input_tokens=settings.max_input_tokens,
                                                    max_tokens_limit=settings.max_tokens_limit))
    model = resolve_model(settings.model, cache_dir=settings.cache_dir).fingerprint()
    artifact, _ = ArtifactStore(settings.cache_dir or default_cache_dir(), settings.tasks_dir).lookup(
        task, model, spec.prompt_sha256())
    job = Job(task, params, Columns.for_task(registry.describe(task), params), source, chunk_rows)
    stats = source.scan()
    identity = job_identity(job, stats, spec=spec, learned=artifact.summary() if artifact else None,
                            model=model, settings=settings)
    state = out.begin(identity, restart=restart)
    if state.complete:
        return drive(job, out, state, stats.rows, iter(()), progress=progress, started=started, actors=0)

    started_here = not ray.is_initialized()
    ctx = saved = None
    try:
        if started_here:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise AllInOneError(f"cannot reach the Ray cluster at {address or 'RAY_ADDRESS/auto'}: {exc}") from None
        if actors is None:
            actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size)
        ctx.execution_options.preserve_order = True  # the writer commits a prefix of the input
        ctx.enable_progress_bars = False  # the command has its own bar
        # a block per chunk: the driver commits each chunk as it comes back, and a kill loses
        # at most the chunks in flight
        ctx.target_max_block_size = 1
        _quiet_console()
        peak, nodes = [0.0], set()
        ds = ray.data.read_datasource(
            InputDatasource(source, state.rows, chunk_rows, stats.rows, stats.size), num_cpus=0)
        ds = ds.map_batches(Labeler, fn_constructor_kwargs={"loader": loader, "settings": settings.model_dump(),
                                                            "job": job},
                            batch_size=1, batch_format="pyarrow", num_cpus=cpus_per_actor,
                            compute=ray.data.ActorPoolStrategy(size=actors))

        def labelled() -> Iterator[tuple[list[str], int, int]]:
            expected = state.rows
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in table.to_pylist():
                    if row["start"] != expected:
                        raise AllInOneError(f"Ray returned the chunk of row {row['start']} where row {expected} was due")
                    expected += len(row["lines"])
                    peak[0] = max(peak[0], row["rss_mb"])
                    nodes.add(row["node"])
                    yield row["lines"], len(row["lines"]) - row["failed"], row["failed"]

        try:
            summary = drive(job, out, state, stats.rows, labelled(), progress=progress, started=started,
                            actors=actors)
        except Exception as exc:
            raise _cause(exc) from None
        return dataclasses.replace(summary, actor_peak_rss_mb=peak[0] or None, nodes=len(nodes))
    finally:
        out.close()
        if saved is not None:  # this process's Ray Data settings, as they were
            ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size = saved
        if started_here and ray.is_initialized():
            ray.shutdown()


def _quiet_console() -> None:
    """Ray Data's own lines (execution plans, timings) go to its log file, not to the terminal
    the command reports to; warnings still do."""
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": on purpose


def _cause(exc: BaseException) -> BaseException:
    """The allinone error behind a Ray task failure (Ray wraps what an actor raised), else a
    one-line error saying the Ray job failed."""
    seen = exc
    while seen is not None:
        if isinstance(seen, AllInOneError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    first = str(exc).strip().splitlines()
    return AllInOneError(f"the Ray job failed: {type(exc).__name__}: {first[0] if first else ''}")
