"""Batch-job figures (issue #14), in one run: `allinone batch` against the HTTP server, its memory
on a big file, and the same job on Ray.

    .venv/bin/python benchmarks/batch.py                      # everything; the 200,000-row run takes hours
    .venv/bin/python benchmarks/batch.py --skip rss           # the rest (~20 min on 2 cores)
    .venv/bin/python benchmarks/batch.py --model x.gguf --task t --tasks-dir tasks --limit 40 --rss-rows 3000 \\
        --out /tmp/batch.md                                   # a smoke run on another model

What is measured (every system on this machine, one at a time, the same task and model):

* rows/s on the SST-2 dev sentences (``--limit``, default all 872): the HTTP server
  (``allinone serve``, ``POST /v1/tasks/{task}`` from 16 concurrent clients, model loaded and
  warm) against ``allinone batch`` (the job's own rows/s: model loading excluded, reading,
  labelling and committing included), both with ``--threads`` threads, and ``batch`` with one thread;
* peak RSS (VmHWM) of ``allinone batch`` on 1,000 rows and on ``--rss-rows`` rows (default
  200,000: the SST-2 rows repeated, ids made unique): memory must stay flat, within 10%;
* the same job with ``--ray`` on a one-node Ray cluster started here (``ray start --head
  --num-cpus=--threads``, stopped afterwards) with 1 and 2 actors of one CPU each: rows/s, the
  command's wall time (cluster connection, actors loading the model, the job) against the local
  run's, and whether its output equals the local run's byte for byte.

Figures are printed and written as a section of ``docs/benchmarks.md`` (between
``<!-- batch -->`` markers; the rest of the file is left as it is). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fixtures.procs import stop  # noqa: E402  (one way to stop a process tree, shared with the Ray test)
from report import write_section  # noqa: E402  (benchmarks/ is the script's folder)

DATA = ROOT.parent / "shared" / "data" / "sst2_dev.jsonl"
CLIENTS = 16


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp  # the inputs and outputs of the runs
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.model_flags = ["--model", args.model, "--backend", args.backend]
        if args.tasks_dir:
            self.model_flags += ["--tasks-dir", str(args.tasks_dir)]
        if args.n_ctx:
            self.model_flags += ["--n-ctx", str(args.n_ctx)]

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "allinone.cli", *args]

    def batch(self, src: Path, out: Path, *extra: str) -> dict:
        """One `allinone batch` command: its JSON summary plus the command's wall time."""
        cmd = self.cli("batch", self.args.task, "--input", str(src), "--output", str(out), "--restart", "--json",
                       *self.model_flags, *extra)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": round(wall, 2)}

    def write_rows(self, path: Path, rows: int, texts: list[str]) -> Path:
        """``rows`` rows: the texts in order, repeated, ids made unique (written as a stream)."""
        with path.open("w", encoding="utf-8") as fh:
            for i in range(rows):
                fh.write(json.dumps({"id": f"r{i}", "text": texts[i % len(texts)]}, ensure_ascii=False) + "\n")
        return path

    # -- the figures ----------------------------------------------------------------------
    def http(self, texts: list[str]) -> dict:
        port = free_port()
        cmd = self.cli("serve", "--port", str(port), "--no-ui", "--log-level", "warning", "--max-queue", "1024",
                       "--n-threads", str(self.args.threads), *self.model_flags)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 900
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"allinone serve exited with {proc.returncode}")
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("allinone serve did not become ready")
                time.sleep(0.5)
            route = f"/v1/tasks/{self.args.task}"
            with httpx.Client(base_url=base, timeout=600, limits=httpx.Limits(max_connections=CLIENTS)) as client:
                client.post(route, json={"text": "warm up"}).raise_for_status()
                start = time.perf_counter()
                with cf.ThreadPoolExecutor(CLIENTS) as pool:
                    list(pool.map(lambda t: client.post(route, json={"text": t}).raise_for_status(), texts))
                seconds = time.perf_counter() - start
            return {"rows": len(texts), "rows_per_s": round(len(texts) / seconds, 3), "peak_rss_mb": round(vm_hwm_mb(proc.pid), 1)}
        finally:
            stop([proc], timeout=15)

    @contextmanager
    def ray_cluster(self):
        port = free_port()
        temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
        # without token authentication (seen with Ray 2.60: once ~/.ray/auth_token exists, `ray
        # start` heads want the token and drivers send none); the batch commands get it too
        env = {**self.env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        self.env = {**self.env, "RAY_AUTH_MODE": "disabled"}
        proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                                 f"--port={port}", f"--num-cpus={self.args.threads}", "--node-ip-address=127.0.0.1",
                                 "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("ray start --head exited (is the ray extra installed?)")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the Ray head did not come up") from None
                    time.sleep(0.5)
            time.sleep(3)  # the raylet registers its CPUs after the GCS port opens
            yield f"127.0.0.1:{port}"
        finally:
            stop([proc], timeout=15)
            shutil.rmtree(temp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> dict:
    bench = Bench(args, tmp)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [r["text"] for r in rows[: args.limit]]
    sst = bench.write_rows(bench.tmp / "sst2.jsonl", len(texts), texts)
    threads = ["--n-threads", str(args.threads)]
    report: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": len(texts),
                    "task": args.task, "model": args.model, "threads": args.threads, "notes": [],
                    "machine": f"{cpu_model()}, {os.cpu_count()} cores, "
                               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB RAM, "
                               f"{platform.system()}, Python {platform.python_version()}",
                    "command": "python benchmarks/batch.py " + " ".join(sys.argv[1:])}
    step = lambda name: print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)  # noqa: E731
    if "http" not in args.skip:
        step(f"HTTP server, {CLIENTS} clients, {len(texts)} rows")
        report["http"] = bench.http(texts)
    step(f"batch, {args.threads} threads")
    report["local"] = bench.batch(sst, bench.tmp / "local.jsonl", *threads)
    if args.threads != 1:
        step("batch, 1 thread")
        report["local_1"] = bench.batch(sst, bench.tmp / "local1.jsonl", "--n-threads", "1")
    if "ray" not in args.skip:
        with bench.ray_cluster() as address:
            for actors in (1, 2):
                step(f"batch --ray, {actors} actor(s)")
                out = bench.tmp / f"ray{actors}.jsonl"
                figure = bench.batch(sst, out, "--ray-address", address, "--actors", str(actors),
                                     "--cpus-per-actor", "1")
                figure["same_as_local"] = out.read_bytes() == (bench.tmp / "local.jsonl").read_bytes()
                report[f"ray_{actors}"] = figure
    if "rss" not in args.skip:
        for n in (args.rss_small, args.rss_rows):
            step(f"batch, {n} rows (peak RSS)")
            src = bench.write_rows(bench.tmp / f"rows{n}.jsonl", n, texts)
            report.setdefault("rss", []).append(bench.batch(src, bench.tmp / f"rows{n}.jsonl.out.jsonl", *threads))
            src.unlink()
            rate = report["rss"][0]["rows_per_s"]
            if n == args.rss_small and rate > 0:
                step(f"at {rate:.1f} rows/s the {args.rss_rows:,}-row run takes about {args.rss_rows / rate / 3600:.1f} h")
    return report


def markdown(r: dict) -> str:
    lines = ["## Batch jobs (issue #14)", "",
             f"Machine: {r['machine']}. Run: {r['when']}. Command: `{r['command']}`. Task `{r['task']}`, model "
             f"`{r['model']}`, {r['rows']} SST-2 dev sentences, {r['threads']} thread(s) unless said.", "",
             "| run | threads | rows/s | wall s (whole command) | peak RSS MB |", "|---|---|---|---|---|"]
    if "http" in r:
        h = r["http"]
        lines.append(f"| HTTP server, {CLIENTS} clients | {r['threads']} | {h['rows_per_s']:.2f} | - | {h['peak_rss_mb']:.0f} |")
    runs = [("local", "`allinone batch`", r["threads"]), ("local_1", "`allinone batch`", 1),
            ("ray_1", "`allinone batch --ray`, 1 actor", "1"), ("ray_2", "`allinone batch --ray`, 2 actors", "1 + 1")]
    for key, name, threads in runs:
        if key in r:
            f = r[key]
            rss = f"{f['peak_rss_mb']:.0f}" + (f" (actors {f['actor_peak_rss_mb']:.0f})" if f.get("actor_peak_rss_mb") else "")
            lines.append(f"| {name} | {threads} | {f['rows_per_s']:.2f} | {f['wall_s']:.1f} | {rss} |")
    lines += ["", "`rows/s` of a batch job is its own figure (`--json`: rows computed / the job's elapsed time; "
              "a local run's model loading is not in it, a Ray run's actor start and model loading are). "
              "The HTTP figure is the 16 clients' rows over their wall time, the model loaded and warm."]
    if "rss" in r:
        small, big = r["rss"]
        ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
        lines += ["", "| rows in the file | peak RSS MB | rows/s |", "|---|---|---|",
                  f"| {small['rows']:,} | {small['peak_rss_mb']:.0f} | {small['rows_per_s']:.2f} |",
                  f"| {big['rows']:,} | {big['peak_rss_mb']:.0f} | {big['rows_per_s']:.2f} |",
                  "", f"Peak RSS on {big['rows']:,} rows is {ratio:.3f}x the RSS on {small['rows']:,} rows."]
    lines += ["", "| target | figure | met |", "|---|---|---|"]
    if "http" in r:
        ratio = r["local"]["rows_per_s"] / r["http"]["rows_per_s"]
        lines.append(f"| batch rows/s >= HTTP server with {CLIENTS} clients | {r['local']['rows_per_s']:.2f} vs "
                     f"{r['http']['rows_per_s']:.2f} ({ratio:.2f}x) | {'yes' if ratio >= 1 else 'no'} |")
    if "rss" in r:
        small, big = r["rss"]
        ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
        lines.append(f"| peak RSS, {big['rows']:,} rows within 10% of {small['rows']:,} rows | {ratio:.3f}x | "
                     f"{'yes' if ratio <= 1.10 else 'no'} |")
    for key, n in (("ray_1", 1), ("ray_2", 2)):
        if key in r:
            same = r[key]["same_as_local"]
            lines.append(f"| Ray ({n} actor{'s' if n > 1 else ''}) output equals the local output | "
                         f"{'byte for byte' if same else 'differs'} | {'yes' if same else 'no'} |")
    if "ray_2" in r:
        local, ray = r["local"], r["ray_2"]
        lines += ["", f"Ray overhead on this machine: 2 actors of 1 thread take {ray['wall_s']:.1f} s for the whole "
                  f"command against {local['wall_s']:.1f} s for the local run with {r['threads']} threads "
                  f"({ray['wall_s'] / local['wall_s']:.2f}x); job rows/s {ray['rows_per_s']:.2f} against "
                  f"{local['rows_per_s']:.2f}."]
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="allinone batch-job benchmarks (issue #14)")
    parser.add_argument("--data", type=Path, default=DATA, help="SST-2 dev rows (JSONL with 'text')")
    parser.add_argument("--limit", type=int, default=872, help="rows of --data for the rows/s figures")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--backend", default="llamacpp")
    parser.add_argument("--tasks-dir", type=Path)
    parser.add_argument("--n-ctx", type=int)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the local runs and the server; Ray CPUs")
    parser.add_argument("--rss-rows", type=int, default=200_000, help="rows of the big file for the memory figure")
    parser.add_argument("--rss-small", type=int, default=1000, help="rows of the small file it is compared with")
    parser.add_argument("--skip", nargs="*", default=[], choices=["http", "ray", "rss"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="allinone-batch-bench-") as tmp:
        report = run(args, Path(tmp))
    section = markdown(report)
    print(section)
    print(json.dumps(report), file=sys.stderr)
    write_section(args.out, "batch", section)


if __name__ == "__main__":
    main()
