"""Turn a model spec (alias, local path or Hugging Face Hub id) into a verified local path.

Accepted specs, tried in this order:

1. An embedded alias (``embedded``, ``embedded-1.5b``; see :data:`EMBEDDED_MODELS`).
2. An existing local path: a ``.gguf`` file, a Hugging Face model folder (``config.json`` +
   weights + tokenizer), or a folder holding exactly one ``.gguf``.
3. A Hub id ``org/name`` (a model folder) or ``org/name:file.gguf`` (one GGUF file of a repo),
   fetched with ``huggingface_hub`` into its usual cache, or taken from that cache when offline.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from allinone.errors import ModelSourceError
from allinone.models.embedded import EMBEDDED_MODELS, ensure_embedded

GGUF_MAGIC = b"GGUF"

#: Files fetched for a Hub model folder: config, tokenizer files, safetensors weights,
#: generation config and chat templates. ``.bin``/``.pt`` weights are left out on purpose
#: (repos usually have both and they would double the download).
HUB_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_GGUF = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<file>[\w./-]+\.gguf)$")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class ModelSource:
    """A model located on the local disk.

    Attributes:
        kind: ``"gguf"`` for a single GGUF file, ``"hf"`` for a Hugging Face model folder
            (``config.json`` + weights + tokenizer).
        path: The ``.gguf`` file or the model folder.
        name: A display id: the embedded model's name, else the file stem, folder name or Hub id.
    """

    kind: Literal["gguf", "hf"]
    path: Path
    name: str
    #: lower-case hex SHA-256 of the model, when known without reading it (the embedded models)
    sha256: str | None = field(default=None, compare=False)

    def fingerprint(self) -> str:
        """The model's SHA-256: of the GGUF file, or of a Hugging Face folder's weight and config
        files (names and contents, in name order). Learned task artifacts are tied to it.
        Read once per file and kept in a ``.sha256`` sidecar next to a GGUF file when it can be
        written (about 2 s per GB)."""
        if self.sha256 is not None:
            return self.sha256
        import hashlib

        if self.kind == "gguf":
            sidecar = self.path.with_name(self.path.name + ".sha256")
            stat = self.path.stat()
            stamp = f"{stat.st_size} {int(stat.st_mtime)}"
            try:
                lines = sidecar.read_text(encoding="ascii").splitlines()
            except (OSError, UnicodeDecodeError):
                lines = []
            if len(lines) == 2 and lines[1] == stamp:
                digest = lines[0].split()[0]
                object.__setattr__(self, "sha256", digest)
                return digest
            h = hashlib.sha256()
            with self.path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            value = h.hexdigest()
            try:
                sidecar.write_text(f"{value}  {self.path.name}\n{stamp}", encoding="ascii")
            except OSError:
                pass
        else:
            h = hashlib.sha256()
            for f in sorted(self.path.iterdir()):
                if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".model", ".txt"):
                    h.update(f.name.encode() + b"\0")
                    with f.open("rb") as fh:
                        for chunk in iter(lambda: fh.read(1 << 22), b""):
                            h.update(chunk)
            value = h.hexdigest()
        object.__setattr__(self, "sha256", value)
        return value


def default_cache_dir() -> Path:
    """The allinone cache root.

    Returns:
        ``$ALLINONE_CACHE_DIR`` if set (``~`` expanded), else
        ``platformdirs.user_cache_dir("allinone")``. The folder is not created here.
    """
    env = os.environ.get("ALLINONE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("allinone"))


def resolve_model(spec: str = "embedded", *, cache_dir: Path | None = None) -> ModelSource:
    """Locate (and fetch or assemble if needed) the model named by ``spec``.

    Args:
        spec: An embedded alias (``"embedded"``, ``"embedded-1.5b"``), a path to a ``.gguf``
            file or a model folder, a Hub id ``"org/name"``, or ``"org/name:file.gguf"``.
        cache_dir: allinone cache root for assembled embedded models; defaults to
            :func:`default_cache_dir`. Hub downloads use the Hugging Face cache instead
            (``$HF_HUB_CACHE`` / ``$HF_HOME/hub``).

    Returns:
        The located model. The first call for an embedded alias assembles a 0.5-1.1 GB file
        (a few seconds); later calls return at once.

    Raises:
        ModelSourceError: Unknown spec, missing or invalid file/folder, missing chunk packages,
            Hub unreachable with the model not cached, or a Hub repo without usable files.
        ChecksumError: The embedded model's parts do not give the expected size or SHA-256.
    """
    spec = spec.strip()
    if not spec:
        raise ModelSourceError(_accepted_forms("An empty model spec was given."), param="model")

    embedded = EMBEDDED_MODELS.get(spec.lower())
    if embedded is not None:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return ModelSource("gguf", ensure_embedded(embedded, root), embedded.name, sha256=embedded.sha256)

    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_local(path)

    m = _HUB_GGUF.match(spec)
    if m:
        return _resolve_hub(m["repo"], gguf_file=m["file"])
    if _HUB_ID.match(spec):
        return _resolve_hub(spec)

    if spec.lower().endswith(".gguf"):
        raise ModelSourceError(f"GGUF file not found: {path}", param="model")
    raise ModelSourceError(
        _accepted_forms(f"Cannot resolve model {spec!r}: no such file or folder."), param="model"
    )


def _accepted_forms(reason: str) -> str:
    aliases = ", ".join(repr(a) for a in EMBEDDED_MODELS)
    return (
        f"{reason} Accepted forms: an embedded alias ({aliases}); a path to a .gguf file; "
        "a path to a Hugging Face model folder (with config.json) or to a folder holding one "
        "GGUF; a Hugging Face Hub id 'org/name'; or 'org/name:file.gguf' for one GGUF of a repo."
    )


def check_gguf(path: Path) -> Path:
    """Check that ``path`` is a readable file starting with the 4-byte GGUF magic.

    Raises:
        ModelSourceError: Missing, unreadable, or not a GGUF file.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelSourceError(f"Cannot read model file {path}: {exc}", param="model") from exc
    if magic != GGUF_MAGIC:
        raise ModelSourceError(
            f"{path} is not a GGUF file (first 4 bytes are {magic!r}, expected {GGUF_MAGIC!r}).",
            param="model",
        )
    return path


def _check_hf_folder(folder: Path, what: str) -> None:
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{what} {folder} has no config.json.", param="model")
    if not any(next(folder.glob(g), None) for g in _WEIGHT_GLOBS):
        raise ModelSourceError(
            f"{what} {folder} has a config.json but no weight files "
            f"({', '.join(_WEIGHT_GLOBS)}).",
            param="model",
        )


def _resolve_local(path: Path) -> ModelSource:
    if path.is_file():
        return ModelSource("gguf", check_gguf(path), path.stem)
    if not path.is_dir():
        raise ModelSourceError(f"{path} is neither a file nor a folder.", param="model")
    if (path / "config.json").is_file():
        _check_hf_folder(path, "Model folder")
        return ModelSource("hf", path, path.resolve().name)
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ModelSource("gguf", check_gguf(ggufs[0]), ggufs[0].stem)
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelSourceError(
            f"Folder {path} holds {len(ggufs)} GGUF files ({names}); pass the path of one of them.",
            param="model",
        )
    raise ModelSourceError(
        f"Folder {path} is not a model folder: it has no config.json and no .gguf file.",
        param="model",
    )


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later change
    # (tests, an app setting it at startup) is honoured.
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip()
    return env.lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> str | None:
    # Same reason as _hub_offline: huggingface_hub.constants froze these at import time.
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.path.expandvars(os.environ[var]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
    return None


def _resolve_hub(repo_id: str, *, gguf_file: str | None = None) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelSourceError(
            f"Cannot fetch {repo_id!r}: huggingface_hub is not installed.", param="model"
        ) from exc

    offline = _hub_offline()
    label = f"{repo_id}:{gguf_file}" if gguf_file else repo_id
    local_hint = (
        "Pass a local path instead (a .gguf file or a model folder with config.json), "
        "or use the 'embedded' model."
    )
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=[gguf_file] if gguf_file else list(HUB_ALLOW_PATTERNS),
            cache_dir=_hub_cache_dir(),
            local_files_only=offline,
        )
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelSourceError(
            f"Hugging Face Hub model {repo_id!r} was not found or is gated/private "
            f"({type(exc).__name__}). Check the id, log in with `hf auth login` if it is gated, "
            f"or pass a local path. ({local_hint})",
            param="model",
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelSourceError(
            f"Hugging Face Hub model {repo_id!r} has no 'main' revision.", param="model"
        ) from exc
    except LocalEntryNotFoundError as exc:
        why = (
            "offline mode is on (HF_HUB_OFFLINE=1)"
            if offline
            else "the Hugging Face Hub could not be reached"
        )
        raise ModelSourceError(
            f"Model {label!r} is not in the local Hugging Face cache and {why}, so it cannot be "
            f"downloaded. {local_hint} Details: {exc}",
            param="model",
        ) from exc
    except Exception as exc:  # network stack errors vary (httpx, OSError, proxies, ...)
        raise ModelSourceError(
            f"Could not fetch {label!r} from the Hugging Face Hub: {type(exc).__name__}: {exc}. "
            f"{local_hint}",
            param="model",
        ) from exc

    folder_path = Path(folder)
    if gguf_file:
        # An offline snapshot folder may exist without this very file in it.
        file_path = folder_path / gguf_file
        if not file_path.is_file():
            raise ModelSourceError(
                f"{gguf_file!r} is not in the downloaded/cached snapshot of {repo_id!r} "
                f"({folder_path}).",
                param="model",
            )
        return ModelSource("gguf", check_gguf(file_path), label)
    try:
        _check_hf_folder(folder_path, f"Hub model {repo_id!r}: snapshot")
    except ModelSourceError as exc:
        raise ModelSourceError(
            f"{exc.message} If this repo only holds GGUF files, name one: "
            f"'{repo_id}:<file>.gguf'.",
            param="model",
        ) from None
    return ModelSource("hf", folder_path, repo_id)
