"""Soak: many mixed requests against a real `allinone serve`, long prompts mixed in.

    .venv/bin/python benchmarks/soak.py [--requests 2000] [--clients 16] [--write docs/reliability.md]

Starts the server (embedded model, llama.cpp) on a free port and sends ``--requests`` requests
from ``--clients`` threads: sentiment, NER, short chats, OpenAI chat completions (some
streamed, some abandoned by the client after the first chunk), tokenize, bad input (empty text,
a lone surrogate, a seed above 2**64-1, malformed JSON) and, one request in 25, a long chat (about
3,000 tokens). It reports the status codes (a 5xx is a failure), the p50/p99 latency of the short
requests (sentiment, tokenize) overall and while a long prompt was running, and the server's RSS
sampled every 100 requests (growth after warm-up, peak; and by kind of mapping). Run it on an idle machine: its
latencies are the point.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ROOT, free_port, server  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


ARENA_HEAP = 64 * 2**20  # glibc's HEAP_MAX_SIZE on 64-bit


def rss_parts_mb(pid: int) -> dict[str, float]:
    """RSS by kind of mapping (``/proc/PID/smaps``): the GGUF file, glibc's main heap, anonymous
    mappings (llama.cpp's KV and compute buffers, glibc's thread arenas, numpy), other files
    (libraries): where a growth comes from."""
    parts = {"gguf": 0.0, "heap": 0.0, "arenas": 0.0, "anon": 0.0, "files": 0.0}
    kind = "anon"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            path = fields[5] if len(fields) > 5 else ""
            start, end = (int(a, 16) for a in fields[0].split("-"))
            # a glibc thread arena is a heap of at most 64 MiB that starts on a 64 MiB boundary
            arena = start % ARENA_HEAP == 0 and end - start <= ARENA_HEAP
            kind = ("gguf" if path.endswith(".gguf") else "heap" if path == "[heap]"
                    else ("arenas" if arena else "anon") if not path or path.startswith("[anon") else "files")
        elif fields and fields[0] == "Rss:":
            parts[kind] += int(fields[1]) / 1024
    return {k: round(v) for k, v in parts.items()}


def load_texts() -> tuple[list[str], list[str]]:
    def texts(name: str, n: int) -> list[str]:
        with (DATA / name).open(encoding="utf-8") as fh:
            return [json.loads(line)["text"] for _, line in zip(range(n), fh)]

    return texts("sst2_dev.jsonl", 300) + texts("chnsenticorp.jsonl", 100), texts("conll2003_ner.jsonl", 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path, help="append the report to this markdown file")
    args = parser.parse_args()
    sentences, ner_texts = load_texts()
    long_text = " ".join(sentences[:120])  # about 3,000 tokens
    port = free_port()
    cmd = [str(ROOT / ".venv/bin/allinone"), "serve", "--port", str(port), "--no-ui", "--log-level", "warning",
           "--max-queue", "256", "--n-threads", str(args.threads)]
    statuses: Counter[int] = Counter()
    short: list[tuple[float, bool]] = []  # (seconds, a long prompt was running)
    long_running = [0]
    lock = threading.Lock()
    rss: list[tuple[int, float]] = []
    parts: list[tuple[int, dict[str, float]]] = []
    done = [0]
    rng = random.Random(0)
    plan = [rng.random() for _ in range(args.requests)]

    with server(cmd, port, "/health") as (base, proc):
        rss.append((0, rss_mb(proc.pid)))
        parts.append((0, rss_parts_mb(proc.pid)))

        def one(client: httpx.Client, r: float, i: int) -> None:
            text = sentences[i % len(sentences)]
            t0 = time.perf_counter()
            kind = "other"
            try:
                if r < 0.04:
                    kind = "long"
                    with lock:
                        long_running[0] += 1
                    try:
                        resp = client.post("/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": long_text + "\nSummarize this."}],
                            "max_tokens": 16, "temperature": 0})
                    finally:
                        with lock:
                            long_running[0] -= 1
                elif r < 0.40:
                    kind = "short"
                    resp = client.post("/v1/tasks/sentiment", json={"text": text})
                elif r < 0.50:
                    kind = "short"
                    resp = client.post("/v1/tokenize", json={"text": text})
                elif r < 0.62:
                    resp = client.post("/v1/tasks/ner", json={"text": ner_texts[i % len(ner_texts)]})
                elif r < 0.74:
                    resp = client.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": f"One line about: {text[:80]}"}], "max_tokens": 24})
                elif r < 0.82:
                    with client.stream("POST", "/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 48,
                            "stream": True}) as stream:
                        for _ in stream.iter_lines():
                            break  # the client goes away after the first event
                        resp = stream
                elif r < 0.88:
                    resp = client.post("/v1/tasks/analyze", json={"text": text, "max_tokens": 16})
                else:  # bad input: every one must be a 4xx
                    bad = [
                        ("/v1/tasks/sentiment", '{"text": ""}'),
                        ("/v1/tasks/sentiment", '{"text": "bad \\ud800 text"}'),
                        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}'),
                        ("/v1/tasks/sentiment", '{"text": '),
                    ][i % 4]
                    resp = client.post(bad[0], content=bad[1], headers={"Content-Type": "application/json"})
                code = resp.status_code
            except httpx.HTTPError:
                code = 0
            seconds = time.perf_counter() - t0
            with lock:
                statuses[code] += 1
                if kind == "short":
                    short.append((seconds, long_running[0] > 0))
                done[0] += 1
                if done[0] % 100 == 0:
                    rss.append((done[0], rss_mb(proc.pid)))
                    parts.append((done[0], rss_parts_mb(proc.pid)))

        def worker(k: int) -> None:
            with httpx.Client(base_url=base, timeout=900) as client:
                for i in range(k, args.requests, args.clients):
                    one(client, plan[i], i)

        start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        health = httpx.get(base + "/health").status_code

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return 1000 * values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    all_short = [s for s, _ in short]
    during = [s for s, busy in short if busy]
    warm = [m for n, m in rss if n >= 200] or [m for _, m in rss]
    report = {
        "requests": args.requests, "clients": args.clients, "elapsed_s": round(elapsed, 1),
        "statuses": dict(sorted(statuses.items())), "server_errors": sum(v for k, v in statuses.items() if k >= 500 or k == 0),
        "short_p50_ms": round(pct(all_short, 0.5), 1), "short_p99_ms": round(pct(all_short, 0.99), 1),
        "short_during_long_p50_ms": round(pct(during, 0.5), 1), "short_during_long_p99_ms": round(pct(during, 0.99), 1),
        "short_during_long_n": len(during),
        "rss_mb": [(n, round(m)) for n, m in rss], "rss_growth_after_warmup_mb": round(max(warm) - warm[0], 1),
        "rss_peak_mb": round(max(m for _, m in rss), 1), "health_after": health,
        "rss_parts_mb": parts,
    }
    print(json.dumps(report))
    if args.write:
        lines = ["", f"## Soak ({time.strftime('%Y-%m-%d')}, {args.requests} requests, {args.clients} clients)", "",
                 "`.venv/bin/python benchmarks/soak.py --requests "
                 f"{args.requests} --clients {args.clients} --write {args.write}` on an idle machine.", "",
                 "| figure | value |", "|---|---|"]
        for key in ("elapsed_s", "statuses", "server_errors", "short_p50_ms", "short_p99_ms", "short_during_long_p50_ms",
                    "short_during_long_p99_ms", "short_during_long_n", "rss_growth_after_warmup_mb", "rss_peak_mb",
                    "health_after"):
            lines.append(f"| {key} | {report[key]} |")
        lines += ["", "RSS (MB) every 100 requests: " + ", ".join(f"{n}: {m}" for n, m in report["rss_mb"]), "",
                  "By kind of mapping (MB; gguf = the model file, heap = glibc's main heap, arenas = its "
                  "thread arenas, anon = llama.cpp's buffers and other mappings): " + ", ".join(f"{n}: {p}" for n, p in parts[::5] + parts[-1:]), ""]
        with args.write.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines))
    if report["server_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
