"""Side-by-side serving benchmarks: allinone (both backends) vs the baselines, in one run.

    .venv/bin/pip install -e '.[bench]'      # llama-cpp-python's own server needs starlette-context
    .venv/bin/python benchmarks/serving.py [--sentences 100] [--throughput-limit 872] [--out docs/benchmarks.md]

What is measured (all servers on 127.0.0.1, one at a time, the same embedded GGUF):

* sentiment latency p50/p95, one request at a time, on the first ``--sentences`` SST-2 dev
  sentences: allinone over HTTP (``POST /v1/tasks/sentiment``) on llama.cpp and on transformers;
  the seed-style baseline in process (transformers FP32, the full prompt every time,
  ``generate(max_new_tokens=1)``, as the original design did); llama-cpp-python's own server
  (``python -m llama_cpp.server``, a chat completion with ``max_tokens=1``). Both baselines get
  exactly the messages allinone's sentiment task renders, so only the serving differs;
* sentiment throughput (sentences/s) on SST-2 dev, sequential and with 1, 4 and 16 concurrent
  HTTP clients (allinone, llama.cpp backend);
* chat: time to first token and decode tokens/s for one stream and for 8 concurrent streams
  (OpenAI-compatible route, streamed), and time to first token by turn number 1..10 of one
  conversation;
* raw llama-cpp-python decode speed in process on the same prompts (the ceiling for decode);
* peak RSS of each server process (VmHWM from /proc), per backend;
* a table of the issue's targets, met or not.

Figures are printed and written as a markdown report. This is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "sst2_dev.jsonl"


def sentiment_messages(text: str) -> list[dict]:
    """The messages allinone's sentiment task sends for ``text``: the baselines get the very
    same prompt, so only the serving differs."""
    from allinone.tasks import Limits, TaskRegistry, kind_of

    spec = TaskRegistry().get("sentiment")
    kind = kind_of(spec)
    return kind.compile(spec, kind.request(spec, text, {}, Limits())).prompt.written(text)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
CHAT_PROMPTS = ["Write a short paragraph about the history of the bicycle.", "用三句话介绍一下杭州西湖。",
                "Explain what a hash table is to a beginner.", "Give me three tips for learning to cook.",
                "What is the difference between weather and climate?", "写一首关于秋天的短诗。",
                "How do vaccines work?", "Describe a good morning routine."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def server(cmd: list[str], port: int, ready_path: str, timeout: float = 900):
    """Start a server process, wait until ``ready_path`` answers 200, stop it afterwards."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
            try:
                if httpx.get(base + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)} did not become ready")
            time.sleep(0.5)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def timed(fn, items) -> list[float]:
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - start)
    return out


def latency_row(name: str, seconds: list[float]) -> dict:
    return {"system": name, "p50_ms": 1000 * statistics.median(seconds), "p95_ms": 1000 * pct(seconds, 0.95), "n": len(seconds)}


THREADS = os.cpu_count() or 1  # set by --threads: the same for every system measured


def allinone_cmd(backend: str, port: int) -> list[str]:
    return [str(ROOT / ".venv/bin/allinone"), "serve", "--port", str(port), "--backend", backend, "--no-ui",
            "--log-level", "warning", "--max-queue", "1024"]


def bench_allinone(backend: str, sentences: list[str], throughput_texts: list[str], report: dict) -> None:
    port = free_port()
    with server(allinone_cmd(backend, port), port, "/health") as (base, proc):
        client = httpx.Client(base_url=base, timeout=600)
        sentiment = lambda t: client.post("/v1/tasks/sentiment", json={"text": t}).raise_for_status()  # noqa: E731
        sentiment("warm up")
        report["latency"].append(latency_row(f"allinone ({backend})", timed(sentiment, sentences)))
        if backend == "llamacpp":
            report["throughput"] = throughput(base, throughput_texts)
            report["chat"] = chat_figures(base)
        report["rss"].append({"system": f"allinone serve ({backend})", "peak_rss_mb": peak_rss_mb(proc.pid)})


def throughput(base: str, texts: list[str]) -> list[dict]:
    rows = []
    with httpx.Client(base_url=base, timeout=600) as client:
        start = time.perf_counter()
        for t in texts:
            client.post("/v1/tasks/sentiment", json={"text": t}).raise_for_status()
        seq = len(texts) / (time.perf_counter() - start)
    rows.append({"clients": "sequential", "sentences_per_s": seq})
    for clients in (1, 4, 16):
        with httpx.Client(base_url=base, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
            start = time.perf_counter()
            with cf.ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda t: client.post("/v1/tasks/sentiment", json={"text": t}).raise_for_status(), texts))
            rows.append({"clients": clients, "sentences_per_s": len(texts) / (time.perf_counter() - start)})
    return rows


def stream_chat(base: str, messages: list[dict], max_tokens: int = 96) -> tuple[float, float, int, str]:
    """(time to first token s, decode tokens/s after the first, completion tokens, text)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    parts, n = [], 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                n = obj["usage"]["completion_tokens"]
            for choice in obj.get("choices", []):
                text = choice["delta"].get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    end = time.perf_counter()
    first = first or end
    rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
    return first - start, rate, n, "".join(parts)


def chat_figures(base: str) -> dict:
    one = [stream_chat(base, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS[:3]]
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        many = list(pool.map(lambda p: stream_chat(base, [{"role": "user", "content": p}]), CHAT_PROMPTS))
    wall = time.perf_counter() - start
    turns, history = [], []
    for i in range(10):
        history.append({"role": "user", "content": f"Turn {i + 1}: tell me one more fact about the ocean."})
        ttft, _, _, text = stream_chat(base, history, max_tokens=48)
        history.append({"role": "assistant", "content": text})
        turns.append(ttft)
    return {
        "one_stream": {"ttft_ms": 1000 * statistics.median(x[0] for x in one), "decode_tok_s": statistics.median(x[1] for x in one)},
        "eight_streams": {"ttft_ms_median": 1000 * statistics.median(x[0] for x in many),
                          "aggregate_tok_s": sum(x[2] for x in many) / wall},
        "ttft_ms_by_turn": [1000 * t for t in turns],
    }


def bench_llama_server(gguf: Path, sentences: list[str], report: dict) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--n_ctx", "4096",
           "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS)]
    try:
        ctx = server(cmd, port, "/v1/models")
        base, proc = ctx.__enter__()
    except RuntimeError as exc:
        report["notes"].append(f"llama-cpp-python server not measured: {exc} (pip install -e '.[bench]')")
        return
    try:
        client = httpx.Client(base_url=base, timeout=600)

        def ask(t: str) -> None:
            client.post("/v1/chat/completions", json={"messages": sentiment_messages(t),
                                                     "max_tokens": 1, "temperature": 0}).raise_for_status()

        ask("warm up")
        report["latency"].append(latency_row("llama-cpp-python server (max_tokens=1)", timed(ask, sentences)))
        report["rss"].append({"system": "llama_cpp.server", "peak_rss_mb": peak_rss_mb(proc.pid)})
    finally:
        ctx.__exit__(None, None, None)


def bench_raw_decode(gguf: Path, report: dict, max_tokens: int = 96) -> None:
    """Decode tokens/s of llama-cpp-python's own ``Llama`` in process (greedy, the same chat
    prompts as the one-stream chat figure): the ceiling allinone's decode is compared with."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    rates, ttfts = [], []
    for prompt in CHAT_PROMPTS[:3]:
        start = time.perf_counter()
        first, n = None, 0
        for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                                temperature=0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                n += 1
        end = time.perf_counter()
        ttfts.append(first - start)
        rates.append((n - 1) / (end - first))
    report["raw_decode"] = {"decode_tok_s": statistics.median(rates), "ttft_ms": 1000 * statistics.median(ttfts)}
    llm.close()


def bench_seed(sentences: list[str], report: dict) -> None:
    """The original design: transformers FP32, full prompt each time, generate one token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from allinone.models import gguf_to_hf, resolve_model

    torch.set_num_threads(THREADS)
    folder = gguf_to_hf(resolve_model("embedded").path)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def ask(t: str) -> None:
        ids = tok.apply_chat_template(sentiment_messages(t), add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=1, do_sample=False)

    ask("warm up")
    report["latency"].append(latency_row("seed-style (transformers FP32, generate 1 token)", timed(ask, sentences)))


def markdown(report: dict) -> str:
    lat = report["latency"]
    ours = next((r for r in lat if r["system"] == "allinone (llamacpp)"), None)
    lines = ["# Benchmarks", "", f"Machine: {report['machine']}. Run: {report['when']}. Command: `{report['command']}`.", "",
             "## Sentiment latency, one request at a time (SST-2 dev sentences)", "",
             "| system | p50 ms | p95 ms | n | p50 ratio vs allinone (llamacpp) |", "|---|---|---|---|---|"]
    for r in lat:
        ratio = f"{r['p50_ms'] / ours['p50_ms']:.2f}x" if ours else "-"
        lines.append(f"| {r['system']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['n']} | {ratio} |")
    if report.get("throughput"):
        seq = report["throughput"][0]["sentences_per_s"]
        lines += ["", "## Sentiment throughput (allinone, llama.cpp backend, HTTP)", "",
                  "| clients | sentences/s | vs sequential |", "|---|---|---|"]
        lines += [f"| {r['clients']} | {r['sentences_per_s']:.2f} | {r['sentences_per_s'] / seq:.2f}x |" for r in report["throughput"]]
    if report.get("chat"):
        c = report["chat"]
        lines += ["", "## Chat (allinone, llama.cpp backend, streamed, greedy)", "",
                  f"- one stream: time to first token {c['one_stream']['ttft_ms']:.0f} ms, decode {c['one_stream']['decode_tok_s']:.1f} tokens/s",
                  f"- 8 concurrent streams: median time to first token {c['eight_streams']['ttft_ms_median']:.0f} ms, "
                  f"aggregate {c['eight_streams']['aggregate_tok_s']:.1f} tokens/s",
                  "- time to first token by turn (ms): " + ", ".join(f"{t:.0f}" for t in c["ttft_ms_by_turn"])]
    if report.get("raw_decode"):
        r = report["raw_decode"]
        lines += [f"- raw llama-cpp-python `Llama` in process, same prompts: decode {r['decode_tok_s']:.1f} tokens/s, "
                  f"time to first token {r['ttft_ms']:.0f} ms"]
    lines += ["", "## Peak RSS", "", "| process | peak RSS MB |", "|---|---|"]
    lines += [f"| {r['system']} | {r['peak_rss_mb']:.0f} |" for r in report["rss"]]
    lines += ["", "## Targets (issue #4)", "", "| target | figure | met |", "|---|---|---|"]
    lines += [f"| {name} | {figure} | {'yes' if ok else 'no'} |" for name, figure, ok in targets(report)]
    lines += [f"\n- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[tuple[str, str, bool]]:
    """(target, measured figure, met) for every target whose figures this run has."""
    rows = []
    lat = {r["system"]: r for r in report["latency"]}
    ours = lat.get("allinone (llamacpp)")
    if ours:
        rows.append(("sentiment p50 <= 200 ms", f"{ours['p50_ms']:.0f} ms", ours["p50_ms"] <= 200))
        for name, factor in (("seed-style", 6), ("llama-cpp-python server", 2)):
            base = next((r for s, r in lat.items() if s.startswith(name)), None)
            if base:
                ratio = base["p50_ms"] / ours["p50_ms"]
                rows.append((f">= {factor}x faster than {name} (p50)", f"{ratio:.2f}x", ratio >= factor))
    if report.get("throughput"):
        seq = report["throughput"][0]["sentences_per_s"]
        best = max(report["throughput"][1:], key=lambda r: r["sentences_per_s"])
        rows.append((">= 5 sentences/s with batching", f"{best['sentences_per_s']:.2f}/s ({best['clients']} clients)",
                     best["sentences_per_s"] >= 5))
        rows.append((">= 2x the sequential throughput", f"{best['sentences_per_s'] / seq:.2f}x", best["sentences_per_s"] >= 2 * seq))
    chat = report.get("chat")
    if chat and report.get("raw_decode"):
        share = chat["one_stream"]["decode_tok_s"] / report["raw_decode"]["decode_tok_s"]
        rows.append(("one-stream decode >= 95% of raw llama-cpp-python", f"{100 * share:.0f}%", share >= 0.95))
    if chat:
        agg = chat["eight_streams"]["aggregate_tok_s"] / chat["one_stream"]["decode_tok_s"]
        rows.append(("8 streams aggregate >= 2x one stream", f"{agg:.2f}x", agg >= 2))
        turns = chat["ttft_ms_by_turn"]
        rows.append(("time to first token turn 10 <= 1.3x turn 1", f"{turns[-1] / turns[0]:.2f}x", turns[-1] <= 1.3 * turns[0]))
    for r in report["rss"]:
        limit = {"allinone serve (llamacpp)": 1024, "allinone serve (transformers)": 2560}.get(r["system"])
        if limit:
            rows.append((f"peak RSS {r['system']} <= {limit / 1024:.1f} GB", f"{r['peak_rss_mb']:.0f} MB", r["peak_rss_mb"] <= limit))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="allinone serving benchmarks vs baselines")
    parser.add_argument("--sentences", type=int, default=100)
    parser.add_argument("--throughput-limit", type=int, default=872)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers", "seed", "llama-server"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of every system measured")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    os.environ["ALLINONE_N_THREADS"] = str(THREADS)  # the allinone servers read it
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    sentences = [r["text"] for r in rows[: args.sentences]]
    report = {"latency": [], "rss": [], "notes": [], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores ({args.threads} thread(s) per system measured), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB RAM, "
                         f"{platform.system()}, Python {platform.python_version()}, no GPU",
              "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:])}
    bench_allinone("llamacpp", sentences, [r["text"] for r in rows[: args.throughput_limit]], report)
    if "transformers" not in args.skip:
        bench_allinone("transformers", sentences, [], report)
    from allinone.models import resolve_model

    gguf = resolve_model("embedded").path
    bench_raw_decode(gguf, report)
    if "llama-server" not in args.skip:
        bench_llama_server(gguf, sentences, report)
    if "seed" not in args.skip:
        bench_seed(sentences, report)
    text = markdown(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
    main()
