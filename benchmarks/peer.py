"""llama.cpp's own tools as baselines, built once from the llama.cpp sources inside the
llama-cpp-python source distribution the install uses (same version, same CPU flags).

    .venv/bin/python benchmarks/peer.py            # builds (once) and prints the two paths

``llama-server`` (the C++ server that Ollama and LM Studio run underneath: continuous batching,
prompt cache, parallel slots) and ``llama-batched-bench`` (the cost of one decode step of N
sequences) are built with CMake into ``<cache>/peer/llama.cpp-<version>/build`` and reused.
Both are started with ``--no-repack`` where they load weights: llama.cpp's AMX kernels crash on
this machine's CPU (see ``backends/llamacpp.py``), and allinone loads without repacked weights
too, so the comparison is like for like.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("llama-server", "llama-batched-bench")


def cache_root() -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from allinone.models import default_cache_dir

    return default_cache_dir() / "peer"


def build(jobs: int = 2) -> dict[str, Path]:
    """The built tools (name -> path), building them first if needed.

    Raises:
        RuntimeError: the source distribution cannot be fetched or the build fails.
    """
    import llama_cpp

    version = llama_cpp.__version__
    home = cache_root() / f"llama.cpp-{version}"
    out = {name: home / "build" / "bin" / name for name in TARGETS}
    if all(p.is_file() for p in out.values()):
        return out
    home.mkdir(parents=True, exist_ok=True)
    sdist = next(home.glob("llama_cpp_python-*.tar.gz"), None)
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(home), "-q"], check=True)
        sdist = next(home.glob("llama_cpp_python-*.tar.gz"))
    src = home / "src"
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
            tar.extractall(home / "x", members=members, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        shutil.move(str(home / "x" / top / "vendor" / "llama.cpp"), str(src))
        shutil.rmtree(home / "x", ignore_errors=True)
    build_dir = home / "build"
    # llama-cpp-python builds ggml with GGML_NATIVE (the default): the same here
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=ON",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs), "--target", *TARGETS],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ})
    missing = [n for n, p in out.items() if not p.is_file()]
    if missing:
        raise RuntimeError(f"the build did not produce {', '.join(missing)} in {build_dir / 'bin'}")
    return out


def server_cmd(tool: Path, gguf: Path, port: int, *, threads: int, parallel: int, ctx_per_slot: int = 4096) -> list[str]:
    """``llama-server`` with ``parallel`` slots of ``ctx_per_slot`` tokens each (``-c`` is the
    total, split over the slots), otherwise its own defaults (prompt cache and continuous
    batching on, flash attention "auto")."""
    return [str(tool), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "--no-repack",
            "--no-webui", "--log-disable"]


def batched_bench(tool: Path, gguf: Path, *, threads: int, npl: list[int], pp: int = 128, tg: int = 16,
                  unified: bool = False, env: dict[str, str] | None = None) -> list[dict]:
    """``llama-batched-bench``: per number of sequences B, one ``pp``-token prompt each, then
    ``tg`` decode steps of one token per sequence. Returns rows with ``step_ms`` (T_TG / tg) and
    ``prefill_tok_s`` (S_PP).

    Raises:
        subprocess.CalledProcessError: the tool fails.
    """
    ctx = max(npl) * (pp + tg) + 16
    cmd = [str(tool), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "-b", "512",
           "-ub", "512", "-npp", str(pp), "-ntg", str(tg), "-npl", ",".join(map(str, npl)), "--no-repack",
           "-fa", "off", "--output-format", "jsonl"]
    if unified:
        cmd.append("-kvu")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    rows = []
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows.append({"sequences": r["pl"], "step_ms": 1000 * r["t_tg"] / r["tg"], "prefill_tok_s": r["speed_pp"]})
    return rows


if __name__ == "__main__":
    for name, path in build().items():
        print(name, path)
