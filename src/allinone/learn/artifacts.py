"""Learned-task artifacts: one safetensors file per task and model, with its description inside.

An artifact holds the tensors of what a task learned (a head's weights, a feature
standardization) and, in the safetensors header's metadata under ``allinone``, a JSON object
saying what it is: the task, the method, the features it reads, the labels or types, the
model's SHA-256 it was fit for, the training data (file name, SHA-256, rows) and the
cross-validation figures. A readable copy of that JSON is written next to it as
``<name>.json``; only the safetensors file is read back.

Files are written to a temporary name and renamed into place, so a reader sees the previous
artifact or the new one, never half of one, and an interrupted fit leaves the previous one.

Where artifacts live (:class:`ArtifactStore`), first found wins:

1. next to a task declared in a folder: ``<tasks_dir>/<task>.<model>.safetensors``;
2. the cache: ``<cache_dir>/learned/<model>/<task>.safetensors`` (built-in tasks fit by the
   user, and tasks registered from Python);
3. shipped with the package: ``allinone/learn/shipped/<task>.<model>.safetensors``.

``<model>`` is the first 16 hex digits of the model's SHA-256.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError

FORMAT = 1


@dataclass(frozen=True)
class Artifact:
    """What one task learned for one model: ``meta`` (the description) and ``tensors``."""

    meta: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(repr=False)
    path: Path | None = None

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def model_sha256(self) -> str:
        return self.meta["model_sha256"]

    def summary(self) -> dict[str, Any]:
        """What a listing shows: method, data, figures, where it is."""
        keys = ("method", "features", "labels", "types", "data", "cv", "created", "model_sha256")
        out = {k: self.meta[k] for k in keys if k in self.meta}
        if self.path is not None:
            out["path"] = str(self.path)
        return out


def save(artifact: Artifact, path: Path) -> Path:
    """Write ``artifact`` to ``path`` (and ``path`` with ``.json``) atomically.

    Raises:
        ArtifactError: the folder cannot be written.
    """
    from safetensors.numpy import save_file

    meta = {**artifact.meta, "format": FORMAT}
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v) for k, v in artifact.tensors.items()}
        for target, write in ((path, lambda tmp: save_file(tensors, tmp, metadata={"allinone": json.dumps(meta)})),
                              (path.with_suffix(".json"),
                               lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                                                encoding="utf-8"))):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            try:
                write(tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(tmp, 0o644)  # mkstemp makes it 0600: a server run as another user must read it
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError as exc:
        raise ArtifactError(f"cannot write the artifact {path}: {exc.strerror or exc}") from None
    return path


def load(path: Path) -> Artifact:
    """Read an artifact.

    Raises:
        ArtifactError: not a readable safetensors file with allinone metadata.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta_text = (fh.metadata() or {}).get("allinone")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises SafetensorError (a RuntimeError) or OSError
        raise ArtifactError(f"{path}: not a readable artifact ({exc})") from None
    if not meta_text:
        raise ArtifactError(f"{path}: no allinone metadata in this safetensors file")
    try:
        meta = json.loads(meta_text)
    except ValueError:
        raise ArtifactError(f"{path}: its metadata is not JSON") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: artifact format {meta.get('format')!r}; this allinone reads {FORMAT}")
    return Artifact(meta, tensors, Path(path))


def model_key(sha256: str) -> str:
    return sha256[:16]


class ArtifactStore:
    """Finds and places artifacts (see the module docstring for the order).

    Args:
        cache_dir: the allinone cache root.
        tasks_dir: the user's tasks folder, if any.
    """

    def __init__(self, cache_dir: Path, tasks_dir: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.tasks_dir = Path(tasks_dir) if tasks_dir is not None else None

    def target(self, task: str, sha256: str, *, declared_in: Path | None = None) -> Path:
        """Where a fit of ``task`` for the model ``sha256`` is written: next to the declaration
        when it comes from the tasks folder, else in the cache."""
        key = model_key(sha256)
        if declared_in is not None and self.tasks_dir is not None and declared_in.parent == self.tasks_dir:
            return self.tasks_dir / f"{task}.{key}.safetensors"
        return self.cache_dir / "learned" / key / f"{task}.safetensors"

    def candidates(self, task: str, sha256: str) -> list[Path]:
        key = model_key(sha256)
        out = []
        if self.tasks_dir is not None:
            out.append(self.tasks_dir / f"{task}.{key}.safetensors")
        out.append(self.cache_dir / "learned" / key / f"{task}.safetensors")
        out.append(Path(str(resources.files(__package__) / "shipped" / f"{task}.{key}.safetensors")))
        return out

    def shipped(self, task: str, sha256: str) -> Path | None:
        """The artifact of ``task`` shipped with the package for this model, if there is one."""
        path = self.candidates(task, sha256)[-1]
        return path if path.is_file() else None

    def remove(self, task: str, sha256: str, *, declared_in: Path | None = None) -> list[Path]:
        """Delete the user's fit of ``task`` for this model (the file :meth:`target` names and
        its ``.json``), so that the shipped artifact, if any, or the prompt serves it again.
        Shipped artifacts are never removed. Returns the paths deleted (none: nothing was fit).

        Raises:
            ArtifactError: a file cannot be deleted.
        """
        path = self.target(task, sha256, declared_in=declared_in)
        removed = []
        for target in (path, path.with_suffix(".json")):
            try:
                target.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ArtifactError(f"cannot remove {target}: {exc.strerror or exc}") from None
            removed.append(target)
        return removed

    def find(self, task: str, sha256: str) -> Artifact | None:
        """The first artifact of ``task`` fit for this model, or None.

        Raises:
            ArtifactError: a file is there but unreadable, or fit for another model.
        """
        for path in self.candidates(task, sha256):
            if path.is_file():
                artifact = load(path)
                if artifact.model_sha256 != sha256 or artifact.task != task:
                    raise ArtifactError(f"{path} was fit for task {artifact.task!r} on model "
                                        f"{artifact.model_sha256[:16]}, not {task!r} on {sha256[:16]}")
                return artifact
        return None

    def others(self, task: str, sha256: str) -> list[str]:
        """Model keys other than this one that ``task`` has artifacts for (to say why a task
        falls back to prompting)."""
        keys = set()
        roots = [self.cache_dir / "learned"]
        for root in roots:
            if root.is_dir():
                keys |= {p.parent.name for p in root.glob(f"*/{task}.safetensors")}
        for folder in [self.tasks_dir, Path(str(resources.files(__package__) / "shipped"))]:
            if folder is not None and folder.is_dir():
                keys |= {p.name.split(".")[1] for p in folder.glob(f"{task}.*.safetensors")}
        keys.discard(model_key(sha256))
        return sorted(keys)

    def lookup(self, task: str, sha256: str | None, prompt_sha256: str | None = None) -> tuple[Artifact | None, str | None]:
        """The artifact serving ``task`` on the model ``sha256`` (or None), and a note saying why
        the task prompts when an artifact exists but cannot serve (unreadable, another model, or
        fit on another version of the task's prompt than ``prompt_sha256``: a head reads the
        states of the prompt it was fit on). The one rule every surface asks."""
        if sha256 is None:
            return None, "the model has no SHA-256 (built in memory): prompting"
        try:
            artifact = self.find(task, sha256)
        except ArtifactError as exc:
            return None, f"{exc.message}: prompting"
        fit_on = artifact.meta.get("prompt_sha256") if artifact is not None else None
        if fit_on is not None and prompt_sha256 is not None and fit_on != prompt_sha256:
            return None, (f"{artifact.path} was fit on another version of the task's prompt (instructions, "
                          "template, question, labels or examples changed since): prompting; fit it again")
        if artifact is not None:
            return artifact, None
        others = self.others(task, sha256)
        if others:
            return None, f"learned for other model(s) ({', '.join(others)}), not this one ({sha256[:16]}): prompting"
        return None, None
