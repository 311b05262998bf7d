"""Typed errors of allinone, in one place.

Every surface maps these once: the CLI prints the message and exits non-zero, the HTTP server
turns them into an OpenAI-style error object with the status given by ``status_code``.
Errors that are the caller's fault have a 4xx ``status_code``; the rest are 5xx.
"""

from __future__ import annotations


class AllInOneError(Exception):
    """Base class. ``code`` is a short machine-readable name, ``status_code`` its HTTP status."""

    status_code: int = 500
    code: str = "internal_error"
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInputError(AllInOneError):
    """The caller's input cannot be processed (empty text, bad messages, bad sampling values)."""

    status_code = 400
    code = "invalid_input"
    error_type = "invalid_request_error"


class ContextLengthError(InvalidInputError):
    """A conversation does not fit the context window and the caller asked not to cut it (the
    OpenAI route, as OpenAI answers ``context_length_exceeded``)."""

    code = "context_length_exceeded"


class SessionExistsError(InvalidInputError):
    """A session with the id asked for already exists (HTTP 409, as for any create that conflicts)."""

    status_code = 409
    code = "session_exists"


class UnknownTaskError(AllInOneError):
    """No task of that name is declared."""

    status_code = 404
    code = "unknown_task"
    error_type = "invalid_request_error"


class TaskDeclarationError(AllInOneError):
    """A task declaration is invalid; the message names the file (or source) and every bad field."""

    status_code = 400
    code = "invalid_task"
    error_type = "invalid_request_error"


class SessionNotFoundError(AllInOneError):
    """No stored conversation has that id."""

    status_code = 404
    code = "session_not_found"
    error_type = "invalid_request_error"


class ModelSourceError(AllInOneError):
    """A model could not be located or verified (missing chunk package, bad checksum, no Hub)."""

    status_code = 500
    code = "model_source_error"


class ChecksumError(ModelSourceError):
    code = "checksum_mismatch"


class BackendUnavailableError(AllInOneError):
    """The requested backend's library is not installed or cannot load this kind of model."""

    status_code = 500
    code = "backend_unavailable"


class OverloadedError(AllInOneError):
    """The request queue is full; retry after ``retry_after`` seconds."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TrainingDataError(AllInOneError):
    """Rows a task cannot learn from: not JSONL, a missing or unknown label, too few rows of a
    label, spans that do not match their text. The message names the file and the line."""

    status_code = 400
    code = "invalid_training_data"
    error_type = "invalid_request_error"


class ArtifactError(AllInOneError):
    """A learned-task artifact cannot be read or written, or was fit for another model or task."""

    status_code = 500
    code = "artifact_error"


class KVCacheFullError(OverloadedError):
    """Every KV entry is in use and the budget is spent: too many sequences at once."""


class ModelLoadingError(AllInOneError):
    """The model is still loading (or failed to load); model routes answer 503 meanwhile."""

    status_code = 503
    code = "model_loading"

    def __init__(self, message: str = "the model is loading; retry shortly", *, retry_after: float = 5.0,
                 failed: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        if failed:  # the code /health gives too: retrying soon will not help
            self.code = "model_load_failed"


class AuthenticationError(AllInOneError):
    """A missing or wrong API key."""

    status_code = 401
    code = "invalid_api_key"
    error_type = "invalid_request_error"


class RequestTimeoutError(AllInOneError):
    """The request did not finish within its timeout (queue wait included)."""

    status_code = 504
    code = "timeout"


class ShuttingDownError(AllInOneError):
    """The model is being closed (the server is stopping): the job was not started, or was
    stopped before it finished. Another replica, or this one after its restart, can take it."""

    status_code = 503
    code = "shutting_down"

    def __init__(self, message: str = "the server is shutting down; retry on another instance or after "
                 "the restart", *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CancelledError(AllInOneError):
    """The caller went away (a closed stream, a disconnected client) and the work was stopped."""

    status_code = 499
    code = "cancelled"


class MissingExtraError(AllInOneError):
    """An optional feature's library is not installed; the message names the extra to install
    (e.g. ``pip install 'allinone[ray]'``)."""

    status_code = 500
    code = "missing_extra"


class BatchConflictError(AllInOneError):
    """A batch job's output belongs to another job (a changed input, task, parameters or model),
    or is a file no batch job wrote; nothing is overwritten unless the job is restarted."""

    status_code = 409
    code = "batch_conflict"
    error_type = "invalid_request_error"
