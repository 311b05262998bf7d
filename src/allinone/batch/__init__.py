"""Big inputs: a file of texts through one task, resumable, locally or on a Ray cluster.

* :mod:`.io`: the input read in chunks (JSONL, CSV, Parquet) and the output written in committed
  chunks with a manifest (JSONL, Parquet);
* :mod:`.columns`: a task's result as output columns;
* :mod:`.runner`: the local job (:func:`run_batch`, behind ``AllInOne.batch``) and
  :func:`label_chunk`, the one function that labels a chunk, here and on Ray;
* :mod:`.ray`: the same job on a Ray cluster with Ray Data (behind ``AllInOne.batch_on_ray``).
"""

from .runner import DEFAULT_CHUNK_ROWS, BatchSummary, label_chunk, run_batch

__all__ = ["DEFAULT_CHUNK_ROWS", "BatchSummary", "label_chunk", "run_batch"]
