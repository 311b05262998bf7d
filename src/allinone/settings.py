"""One settings object for every surface: Python keyword arguments, ``ALLINONE_*`` environment
variables and CLI flags all land here. Unknown options fail fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BackendName = Literal["auto", "llamacpp", "transformers"]


class Settings(BaseSettings):
    """All knobs of allinone, with their defaults.

    Every field can be set as ``ALLINONE_<FIELD>`` in the environment, e.g.
    ``ALLINONE_BACKEND=transformers``.
    """

    model_config = SettingsConfigDict(env_prefix="ALLINONE_", extra="forbid", validate_assignment=True)

    # model and backend
    model: str = Field("embedded", description="'embedded', 'embedded-1.5b', a .gguf file, an HF folder or a Hub id")
    backend: BackendName = Field("auto", description="auto: llamacpp for GGUF, transformers for HF folders")
    n_ctx: int = Field(4096, ge=256, le=131072, description="context window in tokens")
    n_threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="transformers weights dtype")
    weights: Literal["shipped", "q8_0", "q4_0", "f16"] = Field(
        "shipped", description="llama.cpp weight format: the GGUF as shipped, or re-quantized once into the cache")
    cache_dir: Path | None = Field(None, description="where assembled/converted models are kept")
    chat_model: str | None = Field(
        None, description="a second model that writes the chat replies (chat, analyze, the OpenAI route, the UI) while "
        "the tasks stay on 'model': 'auto' = 'embedded-1.5b' when installed, else none; default: none, one model")

    # scheduling and caching (see engine/core.py and backends/kv_cache.py)
    kv_cache_mb: float = Field(
        128, ge=1, description="KV cache for all sequences (running replies, task prefixes, conversations), in MB"
    )
    max_batch: int = Field(16, ge=1, le=64, description="most classification prompts computed in one batch")
    max_active: int = Field(16, ge=1, le=48, description="most replies decoded together (continuous batching)")
    batch_invariant: bool = Field(
        False, description="a text's label probabilities, hidden states and greedy replies do not depend on "
        "what else runs (2-11x slower classification, greedy replies one at a time; docs/reliability.md)")

    # tasks
    tasks_dir: Path | None = Field(None, description="a folder of task declarations (*.toml) added to the built-ins")
    learned: bool = Field(True, description="serve tasks with what they learned (allinone fit); off: prompting only")

    # limits
    max_input_tokens: int = Field(1024, ge=16, description="classification input budget in tokens; longer text is cut")
    max_input_chars: int = Field(100_000, ge=1, description="longest accepted text, in characters")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(1024, ge=1, description="max_tokens when a request gives none "
                                    "(left unset: at most max_tokens_limit)")
    request_timeout: float | None = Field(300.0, gt=0, description="seconds per request, queue wait included")
    max_queue: int = Field(64, ge=1, description="requests waiting at once; more get 'overloaded'")

    # server (the fields from here on are SERVER_FIELDS)
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="if set, every route but /health needs 'Authorization: Bearer KEY' (browsers: the /login page)")
    metrics_public: bool = Field(False, description="with api_keys set, /metrics still answers without a key")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="allowed CORS origins; none by default")
    db_path: Path | None = Field(None, description="SQLite file for stored conversations (default: in cache_dir)")
    session_history_messages: int = Field(
        50, ge=0, description="most recent stored messages of a session sent to the model with a new one"
    )
    max_request_bytes: int = Field(
        8_000_000, ge=1024, description="largest accepted HTTP request body in bytes; larger gets 413"
    )
    ui: bool = Field(True, description="mount the web chat UI at /ui")

    @model_validator(mode="after")
    def _default_within_limit(self) -> "Settings":
        """A default set above the limit would fail every request that gives no ``max_tokens``;
        the built-in default, not set by the user, follows a lower limit instead
        (:func:`allinone.types.reply_max_tokens`)."""
        if "default_max_tokens" in self.model_fields_set and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must be at most "
                             f"max_tokens_limit ({self.max_tokens_limit})")
        return self

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        """A list given as text (an ``ALLINONE_*`` variable): a JSON list, or values separated by
        commas (``ALLINONE_API_KEYS=key-1,key-2``)."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list ({exc.msg}); give a JSON list or values separated by commas") from None
        return [part.strip() for part in text.split(",") if part.strip()]


#: the fields only ``allinone serve`` uses
SERVER_FIELDS = frozenset({"host", "port", "api_keys", "metrics_public", "cors_origins", "db_path",
                           "session_history_messages", "max_request_bytes", "ui"})
