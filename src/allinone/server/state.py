"""What one app holds at run time (kept on ``app.state.server``, never in module globals)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelLoadingError, OverloadedError
from ..sessions import SessionStore
from .metrics import Metrics

if TYPE_CHECKING:
    from ..api import AllInOne
    from ..settings import Settings

log = logging.getLogger(__name__)


#: seconds after SIGTERM that running requests may take before their model work is failed
#: (:meth:`ServerState.drain`)
DRAIN_S = 5.0
#: uvicorn's graceful shutdown: seconds it waits for open requests before cancelling them
GRACEFUL_S = 10
#: an SSE stream is cut by sse-starlette this long after SIGTERM (the drain has ended it before)
SSE_GRACE_S = 9.0


class Admission:
    """Admits at most ``limit`` model requests at once; the next one gets ``OverloadedError``.

    The engine has one worker, so ``limit = max_queue + 1`` means one request running and
    ``max_queue`` waiting. Counting here (not only in the engine's queue) matters because a
    blocking request holds a server thread while it waits: without a bound, surplus requests
    would pile up in the thread pool instead of being told to come back later.
    """

    def __init__(self, limit: int, retry_after: float = 1.0) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def acquire(self) -> None:
        """Take a slot, or raise :class:`OverloadedError` (HTTP 503 with ``Retry-After``)."""
        with self._lock:
            if self._active >= self.limit:
                raise OverloadedError(
                    f"the server is busy ({self._active} requests in progress); retry shortly",
                    retry_after=self.retry_after,
                )
            self._active += 1

    def release(self) -> None:
        with self._lock:
            self._active = max(0, self._active - 1)


class ServerState:
    """The model (once loaded), the conversation store, the admission bound and the metrics.

    Args:
        settings: the one settings object.
        ai: a ready model; if ``None``, :meth:`load` must be called (the app does it in the
            background on startup) and model routes answer 503 meanwhile.
    """

    def __init__(self, settings: "Settings", ai: "AllInOne | None" = None) -> None:
        self.settings = settings
        self.ai = ai
        self.owns_ai = ai is None
        self.load_error: BaseException | None = None
        self._closed = False
        self.started = int(time.time())
        self.admission = Admission(settings.max_queue + 1)
        self.store = SessionStore(db_path(settings))
        self.metrics = Metrics(
            stats=lambda: self.ai.stats() if self.ai is not None else None,
            in_flight=lambda: self.admission.active,
            model_loaded=lambda: self.ai is not None,
        )

    def require_ai(self) -> "AllInOne":
        """The loaded model.

        Raises:
            ModelLoadingError: still loading, or the load failed (HTTP 503).
        """
        if self.ai is not None:
            return self.ai
        if self.load_error is not None:
            raise ModelLoadingError(f"the model failed to load: {self.load_error}", retry_after=60, failed=True)
        raise ModelLoadingError()

    def load(self) -> None:
        """Load the model of ``settings`` (blocking; run it off the event loop). A failure is
        kept in ``load_error`` and reported by ``/health`` instead of crashing the server."""
        from ..api import AllInOne

        try:
            ai = AllInOne.from_settings(self.settings)
        except Exception as exc:  # reported through /health and 503s; the server stays up
            log.exception("loading the model failed")
            self.load_error = exc
            return
        log.info("model %s loaded on %s in %.1f s", ai.model_id, ai.backend_name, ai.load_seconds)
        if ai.chat_model_id != ai.model_id:
            log.info("chat replies are written by %s", ai.chat_model_id)
        start = time.monotonic()
        try:  # the first feeling told to a new server waited ~5 s per language for this
            ai.warm_up()
        except Exception:  # a cold cache is slower, not broken: serve anyway
            log.warning("warming up the sentiment prefix failed", exc_info=True)
        else:
            log.info("sentiment prefix cached in %.1f s", time.monotonic() - start)
        if self._closed:  # the server shut down while the model was loading
            ai.close()
            return
        self.ai = ai

    def drain(self) -> None:
        """Fail the model work still queued or running with ``ShuttingDownError`` (a 503 error
        object, or a stream's last error event) and free the model; later model requests get
        the same 503. ``allinone serve`` calls it :data:`DRAIN_S` seconds after SIGTERM."""
        ai = self.ai
        if self.owns_ai and ai is not None:
            ai.close(grace=0)

    def close(self) -> None:
        self._closed = True
        if self.owns_ai and self.ai is not None:
            self.ai.close(grace=0)  # at shutdown uvicorn has ended or cancelled every request
            self.ai = None
        self.store.close()


def db_path(settings: "Settings") -> Path | str:
    """``settings.db_path``, or ``sessions.sqlite3`` in the cache folder."""
    if settings.db_path is not None:
        return settings.db_path
    from ..models import default_cache_dir

    return (settings.cache_dir or default_cache_dir()) / "sessions.sqlite3"
