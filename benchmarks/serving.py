"""Side-by-side serving benchmarks: allinone against llama.cpp's own server and the other baselines, in one run.

    .venv/bin/pip install -e '.[bench]'      # llama-cpp-python's own server needs starlette-context
    .venv/bin/python benchmarks/serving.py [--sentences 100] [--throughput-limit 872] [--skip seed ...]

``llama-server`` and ``llama-batched-bench`` are built once from the llama.cpp sources of the
installed llama-cpp-python (``benchmarks/peer.py``; about 5 minutes on 2 cores the first time).
What is measured (all servers on 127.0.0.1, one at a time, the same embedded GGUF, ``--threads``
threads each):

* sentiment latency p50/p95, one request at a time, on the first ``--sentences`` SST-2 dev
  sentences: allinone over HTTP (``POST /v1/tasks/sentiment``) on llama.cpp and on transformers;
  ``llama-server`` with one slot (a chat completion of ``max_tokens: 1`` with the top log-probs,
  prompt cache on); llama-cpp-python's own server (``max_tokens=1``); the seed-style baseline in
  process (transformers FP32, the full prompt every time, ``generate(max_new_tokens=1)``). Every
  baseline gets exactly the messages allinone's sentiment task renders;
* the same allinone latency while one single-threaded busy loop runs on the machine;
* the floor: raw llama.cpp computing only each sentence's own tokens from an empty context;
* sentiment throughput (sentences/s) over ``--throughput-limit`` sentences: allinone
  sequential and with 1, 4 and 16 HTTP clients, ``llama-server -np 16`` with 16 clients;
* chat, streamed and greedy: time to first token and decode tokens/s of one stream, 8 concurrent
  streams, time to first token by turn 1..10 (median of 3 conversations): allinone, ``llama-server``
  (1 slot; 8 slots for the 8 streams); raw llama-cpp-python decode in process;
* one decode step of 1..16 sequences: ``llama-batched-bench`` (KV per sequence and unified)
  against allinone's backend;
* peak RSS of each server process (VmHWM from /proc);
* the issue's targets, met or not.

The report replaces the ``<!-- serving -->`` section of ``--out``. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
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

from report import write_section  # benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "sst2_dev.jsonl"
#: the caller's libgomp spin count, read before allinone's llama.cpp backend sets its own default
#: in this process: child processes (the peers) run with their own defaults, not inherited ones
USER_SPIN = os.environ.get("GOMP_SPINCOUNT")


def child_env() -> dict[str, str]:
    # a PYTHONPATH already set stays after ours (to measure another tree of allinone)
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    if USER_SPIN is None:
        env.pop("GOMP_SPINCOUNT", None)
    return env


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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
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
            report["contention"] = contention(sentiment, sentences[:50])
            report["throughput"] = throughput(base, throughput_texts)
            report["chat"] = chat_figures(base)
        report["rss"].append({"system": f"allinone serve ({backend})", "peak_rss_mb": peak_rss_mb(proc.pid)})


BUSY = "while True: pass"  # one single-threaded CPU-bound process


def contention(ask, sentences: list[str]) -> dict:
    """p50 of ``ask`` over ``sentences`` idle, then while one single-threaded busy loop runs."""
    idle = timed(ask, sentences)
    other = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(1)
        busy = timed(ask, sentences)
    finally:
        other.kill()
        other.wait()
    return {"n": len(sentences), "idle_p50_ms": 1000 * statistics.median(idle),
            "busy_p50_ms": 1000 * statistics.median(busy), "other": f"python -c '{BUSY}'"}


def bench_floor(gguf: Path, sentences: list[str], report: dict) -> None:
    """The floor of the shipped weights: llama.cpp computing only each sentence's own tokens
    from an empty context (no instructions, no chat template), logits at the last token."""
    from allinone.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf, n_threads=THREADS)
    seconds, lengths = [], []
    try:
        for text in ["warm up", *sentences]:
            ids = backend.tokenize(text)
            backend.kv.clear()
            entry, _ = backend.kv.acquire(ids)
            start = time.perf_counter()
            backend.forward([entry], [ids])
            seconds.append(time.perf_counter() - start)
            lengths.append(len(ids))
            backend.kv.release(entry, keep=False)
    finally:
        backend.close()
    seconds, lengths = seconds[1:], lengths[1:]
    report["floor"] = {"p50_ms": 1000 * statistics.median(seconds), "mean_tokens": statistics.mean(lengths), "n": len(seconds)}


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


def stream_chat(base: str, messages: list[dict], max_tokens: int = 96,
                temperature: float = 0) -> tuple[float, float, int, str]:
    """(time to first token s, decode tokens/s after the first, completion tokens, text)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "seed": 1, "stream": True,
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


def eight_streams(base: str, temperature: float = 0) -> dict:
    """8 concurrent streams, greedy (``temperature`` 0: allinone decodes them one sequence per
    llama_decode, for batch-invariant replies) or sampled (decoded together)."""
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        many = list(pool.map(lambda p: stream_chat(base, [{"role": "user", "content": p}], temperature=temperature),
                             CHAT_PROMPTS))
    wall = time.perf_counter() - start
    return {"ttft_ms_median": 1000 * statistics.median(x[0] for x in many), "aggregate_tok_s": sum(x[2] for x in many) / wall}


TURN_TOPICS = ("Oceans", "Mountains", "Deserts")


def turn_ttfts(base: str) -> list[float]:
    """Time to first token (ms) of turns 1..10: per turn, the median over one conversation per
    topic of :data:`TURN_TOPICS` (one conversation gave one sample per turn, and a single
    outlier, e.g. 807 ms at turn 2 of the 2026-12-06 afternoon run, decided the ratio). Each
    message starts with its topic, so a conversation's first turn shares nothing beyond the
    system prompt with the conversations before it (a shared "Turn 1: tell me one more fact
    about " made later first turns cheap: median turn 1 152 ms against 209 in one conversation)."""
    runs = []
    for topic in TURN_TOPICS:
        turns, history = [], []
        for i in range(10):
            history.append({"role": "user", "content": f"{topic}, turn {i + 1}: tell me one more fact."})
            ttft, _, _, text = stream_chat(base, history, max_tokens=48)
            history.append({"role": "assistant", "content": text})
            turns.append(1000 * ttft)
        runs.append(turns)
    return [statistics.median(run[i] for run in runs) for i in range(10)]


def one_stream(base: str) -> dict:
    """Median time to first token and decode tokens/s of 3 chat prompts, one at a time."""
    one = [stream_chat(base, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS[:3]]
    return {"ttft_ms": 1000 * statistics.median(x[0] for x in one), "decode_tok_s": statistics.median(x[1] for x in one)}


def chat_figures(base: str) -> dict:
    return {
        "one_stream": one_stream(base),
        "eight_streams": eight_streams(base),
        "eight_streams_sampled": eight_streams(base, temperature=0.7),
        "ttft_ms_by_turn": turn_ttfts(base),
    }


def bench_llama_server(gguf: Path, sentences: list[str], report: dict) -> None:
    port = free_port()
    cmd = [sys.executable, "-c", PY_SERVER, "--model", str(gguf), "--port", str(port), "--n_ctx", "4096",
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


def engine_decode_steps(gguf: Path, npl: list[int], pp: int = 128, tg: int = 16) -> list[dict]:
    """The cost of one decode step of B sequences in allinone's llama.cpp backend, set up as
    ``llama-batched-bench`` sets up its own: B distinct ``pp``-token prompts, then ``tg`` steps of
    one token per sequence (one ``forward`` call each, as the engine's decode loop makes them)."""
    from allinone.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf, n_threads=THREADS, kv_cache_mb=max(npl) * (pp + tg + 1) * 12 / 1024 + 8)
    base = backend.tokenize("The quick brown fox jumps over the lazy dog while the band plays on. " * 40)[: pp - 1]
    rows = []
    try:
        for n in npl:
            backend.kv.clear()
            entries = []
            for k in range(n):
                prompt = [base[k % len(base)], *base]  # distinct from the first token: no shared cells
                entry, _ = backend.kv.acquire(prompt)
                backend.forward([entry], [prompt])
                entries.append(entry)
            token = base[0]
            backend.forward(entries, [[token]] * n)  # warm-up step
            start = time.perf_counter()
            for _ in range(tg):
                backend.forward(entries, [[token]] * n)
            rows.append({"sequences": n, "step_ms": 1000 * (time.perf_counter() - start) / tg})
            for entry in entries:
                backend.kv.release(entry, keep=False)
    finally:
        backend.close()
    return rows


def bench_batch_cost(gguf: Path, report: dict, npl: tuple[int, ...] = (1, 2, 4, 8, 16)) -> None:
    """One decode step of 1..16 sequences: llama.cpp's own llama-batched-bench (KV split per
    sequence, and unified as allinone runs it) against allinone's backend, same GGUF and threads."""
    import peer

    tools = peer.build()
    split = peer.batched_bench(tools["llama-batched-bench"], gguf, threads=THREADS, npl=list(npl), env=child_env())
    unified = peer.batched_bench(tools["llama-batched-bench"], gguf, threads=THREADS, npl=list(npl), unified=True,
                                 env=child_env())
    ours = engine_decode_steps(gguf, list(npl))
    report["batch_cost"] = [{"sequences": n, "peer_split_ms": a["step_ms"], "peer_unified_ms": b["step_ms"],
                             "ours_ms": c["step_ms"]} for n, a, b, c in zip(npl, split, unified, ours)]


def bench_peer_server(gguf: Path, sentences: list[str], throughput_texts: list[str], report: dict) -> None:
    """llama.cpp's own ``llama-server`` on the same GGUF and threads: sentiment as a chat
    completion of ``max_tokens: 1`` with the top log-probs (the same messages allinone's task
    renders), one request at a time with 1 slot and 16 clients with 16 slots; chat streams with
    1 slot (one stream, turns) and 8 slots (8 streams)."""
    import peer

    tool = peer.build()["llama-server"]

    def ask(client: httpx.Client, text: str) -> None:
        client.post("/v1/chat/completions", json={"messages": sentiment_messages(text), "max_tokens": 1,
                                                  "temperature": 0, "logprobs": True, "top_logprobs": 2}
                    ).raise_for_status()

    out: dict = {}
    for parallel in (1, 16, 8):
        port = free_port()
        with server(peer.server_cmd(tool, gguf, port, threads=THREADS, parallel=parallel), port, "/health") as (base, proc):
            client = httpx.Client(base_url=base, timeout=600)
            ask(client, "warm up")
            if parallel == 1:
                report["latency"].append(latency_row("llama-server (-np 1, max_tokens 1)", timed(functools.partial(ask, client), sentences)))
                out["one_stream"] = one_stream(base)
                out["ttft_ms_by_turn"] = turn_ttfts(base)
            elif parallel == 16:
                with httpx.Client(base_url=base, timeout=600, limits=httpx.Limits(max_connections=16)) as many:
                    start = time.perf_counter()
                    with cf.ThreadPoolExecutor(16) as pool:
                        list(pool.map(lambda t: ask(many, t), throughput_texts))
                    out["sentences_per_s_16"] = len(throughput_texts) / (time.perf_counter() - start)
            else:
                out["eight_streams"] = eight_streams(base)
                out["eight_streams_sampled"] = eight_streams(base, temperature=0.7)
            report["rss"].append({"system": f"llama-server -np {parallel}", "peak_rss_mb": peak_rss_mb(proc.pid)})
    report["peer"] = out


def no_repack(default_params):
    """llama.cpp's model defaults without "extra" (repacked) weight buffers: its AMX kernels crash
    on this project's Xeon CPUs (see backends/llamacpp.py), and allinone loads without them too."""
    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p
    return params


#: llama-cpp-python's server, started with the same no-repack model defaults
PY_SERVER = ("import runpy, llama_cpp, serving; "
             "llama_cpp.llama_cpp.llama_model_default_params = serving.no_repack(llama_cpp.llama_cpp.llama_model_default_params); "
             "runpy.run_module('llama_cpp.server', run_name='__main__')")


def bench_raw_decode(gguf: Path, report: dict, max_tokens: int = 96) -> None:
    """Decode tokens/s of llama-cpp-python's own ``Llama`` in process (greedy, the same chat
    prompts as the one-stream chat figure): the ceiling allinone's decode is compared with."""
    import llama_cpp
    from llama_cpp import Llama

    default = llama_cpp.llama_cpp.llama_model_default_params
    llama_cpp.llama_cpp.llama_model_default_params = no_repack(default)
    try:
        llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default
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
    lines = [f"Machine: {report['machine']}. Run: {report['when']}. Command: `{report['command']}`; "
             "nothing else ran on the machine but the phases that say so.", "",
             "## Sentiment latency, one request at a time (SST-2 dev sentences)", "",
             "| system | p50 ms | p95 ms | n | p50 ratio vs allinone (llamacpp) |", "|---|---|---|---|---|"]
    for r in lat:
        ratio = f"{r['p50_ms'] / ours['p50_ms']:.2f}x" if ours else "-"
        lines.append(f"| {r['system']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['n']} | {ratio} |")
    if report.get("throughput"):
        seq = report["throughput"][0]["sentences_per_s"]
        lines += ["", "## Sentiment throughput (HTTP)", "",
                  "| system | clients | sentences/s | vs sequential |", "|---|---|---|---|"]
        lines += [f"| allinone (llamacpp) | {r['clients']} | {r['sentences_per_s']:.2f} | {r['sentences_per_s'] / seq:.2f}x |"
                  for r in report["throughput"]]
        if report.get("peer", {}).get("sentences_per_s_16"):
            lines.append(f"| llama-server -np 16 | 16 | {report['peer']['sentences_per_s_16']:.2f} | - |")
    chats = [("allinone (llamacpp)", report.get("chat")), ("llama-server (-np 1; 8 streams -np 8)", report.get("peer"))]
    if any(c for _, c in chats):
        lines += ["", "## Chat (streamed, greedy, up to 96 tokens)", "",
                  "| system | one stream: first token ms | one stream: decode tokens/s | 8 streams: median first token ms | "
                  "8 streams: aggregate tokens/s | first token ms by turn 1..10 (median of 3 conversations) |", "|---|---|---|---|---|---|"]
        for name, c in chats:
            if c and c.get("one_stream"):
                lines.append(f"| {name} | {c['one_stream']['ttft_ms']:.0f} | {c['one_stream']['decode_tok_s']:.1f} | "
                             f"{c['eight_streams']['ttft_ms_median']:.0f} | {c['eight_streams']['aggregate_tok_s']:.1f} | "
                             + ", ".join(f"{t:.0f}" for t in c["ttft_ms_by_turn"]) + " |")
        sampled = [(name, c["eight_streams_sampled"]) for name, c in chats if c and c.get("eight_streams_sampled")]
        if sampled:
            lines += ["", "8 streams sampled (temperature 0.7, seed 1), aggregate tokens/s: "
                      + "; ".join(f"{name} {x['aggregate_tok_s']:.1f}" for name, x in sampled) + "."]
        if report.get("raw_decode"):
            r = report["raw_decode"]
            lines += ["", f"Raw llama-cpp-python `Llama` in process, same prompts: decode {r['decode_tok_s']:.1f} tokens/s, "
                      f"time to first token {r['ttft_ms']:.0f} ms."]
    if report.get("batch_cost"):
        lines += ["", "## One decode step of B sequences (ms; B prompts of 128 tokens, then 16 steps of one token each)", "",
                  "| B | llama-batched-bench, KV per sequence | llama-batched-bench `-kvu` (unified KV, as allinone) | "
                  "allinone backend | allinone / `-kvu` |", "|---|---|---|---|---|"]
        lines += [f"| {r['sequences']} | {r['peer_split_ms']:.1f} | {r['peer_unified_ms']:.1f} | {r['ours_ms']:.1f} | "
                  f"{r['ours_ms'] / r['peer_unified_ms']:.2f}x |" for r in report["batch_cost"]]
    if report.get("contention"):
        c = report["contention"]
        lines += ["", "## Sentiment with one other CPU-bound process running", "",
                  f"allinone (llamacpp), one request at a time, the same {c['n']} sentences: p50 {c['idle_p50_ms']:.0f} ms idle, "
                  f"{c['busy_p50_ms']:.0f} ms while `{c['other']}` ran ({c['busy_p50_ms'] / c['idle_p50_ms']:.2f}x)."]
    if report.get("floor"):
        f = report["floor"]
        lines += ["", f"Floor: raw llama.cpp computing only each sentence's own tokens from an empty context (no prompt): "
                  f"p50 {f['p50_ms']:.0f} ms, mean {f['mean_tokens']:.1f} tokens, n {f['n']}."]
    lines += ["", "## Peak RSS", "", "| process | peak RSS MB |", "|---|---|"]
    lines += [f"| {r['system']} | {r['peak_rss_mb']:.0f} |" for r in report["rss"]]
    lines += ["", "## Targets (issue #15)", "", "| target | figure | met |", "|---|---|---|"]
    lines += [f"| {name} | {figure} | {'yes' if ok else 'no'} |" for name, figure, ok in targets(report)]
    lines += [f"\n- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[tuple[str, str, bool]]:
    """(target, measured figure, met) for every target whose figures this run has."""
    rows = []
    lat = {r["system"]: r for r in report["latency"]}
    ours = lat.get("allinone (llamacpp)")
    peer = report.get("peer", {})
    peer_lat = next((r for s, r in lat.items() if s.startswith("llama-server")), None)
    if ours and peer_lat:
        ratio = ours["p50_ms"] / peer_lat["p50_ms"]
        rows.append(("sentiment p50 <= 0.6x llama-server's (one request at a time)", f"{ratio:.2f}x", ratio <= 0.6))
    if report.get("throughput") and peer.get("sentences_per_s_16"):
        sixteen = next(r for r in report["throughput"] if r["clients"] == 16)["sentences_per_s"]
        ratio = sixteen / peer["sentences_per_s_16"]
        rows.append(("sentiment sentences/s, 16 clients >= 1.5x llama-server -np 16", f"{ratio:.2f}x", ratio >= 1.5))
    chat = report.get("chat")
    if chat and peer.get("one_stream"):
        share = chat["one_stream"]["decode_tok_s"] / peer["one_stream"]["decode_tok_s"]
        rows.append(("one stream's decode >= 95% of llama-server's", f"{100 * share:.0f}%", share >= 0.95))
    if chat and peer.get("eight_streams"):
        ratio = chat["eight_streams"]["aggregate_tok_s"] / peer["eight_streams"]["aggregate_tok_s"]
        rows.append(("8 streams' aggregate tokens/s >= llama-server -np 8", f"{ratio:.2f}x", ratio >= 1))
    if chat:
        turns = chat["ttft_ms_by_turn"]
        rows.append(("time to first token turn 10 <= 1.2x turn 1", f"{turns[-1] / turns[0]:.2f}x", turns[-1] <= 1.2 * turns[0]))
    if ours and report.get("floor"):
        ratio = ours["p50_ms"] / report["floor"]["p50_ms"]
        rows.append(("sentiment p50 <= 1.0x the floor (the sentence's own tokens only)", f"{ratio:.2f}x", ratio <= 1.0))
    if report.get("contention"):
        c = report["contention"]
        ratio = c["busy_p50_ms"] / c["idle_p50_ms"]
        rows.append(("sentiment p50 with one other CPU-bound process <= 2.5x idle", f"{ratio:.2f}x", ratio <= 2.5))
    for r in report["rss"]:
        if r["system"] == "allinone serve (llamacpp)":
            rows.append(("peak RSS allinone serve (llamacpp) <= 1.0 GB", f"{r['peak_rss_mb']:.0f} MB", r["peak_rss_mb"] <= 1024))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="allinone serving benchmarks vs baselines")
    parser.add_argument("--sentences", type=int, default=100)
    parser.add_argument("--throughput-limit", type=int, default=872)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["transformers", "seed", "llama-cpp-python", "llama-server", "batch-cost"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of every system measured")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    os.environ["ALLINONE_N_THREADS"] = str(THREADS)  # the allinone servers read it
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    sentences = [r["text"] for r in rows[: args.sentences]]
    throughput_texts = [r["text"] for r in rows[: args.throughput_limit]]
    report = {"latency": [], "rss": [], "notes": [], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores ({args.threads} thread(s) per system measured), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB RAM, "
                         f"{platform.system()}, Python {platform.python_version()}, no GPU",
              "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:])}
    bench_allinone("llamacpp", sentences, throughput_texts, report)
    if "transformers" not in args.skip:
        bench_allinone("transformers", sentences, [], report)
    from allinone.models import resolve_model

    gguf = resolve_model("embedded").path
    bench_raw_decode(gguf, report)
    bench_floor(gguf, sentences, report)
    if "batch-cost" not in args.skip:
        bench_batch_cost(gguf, report)
    if "llama-server" not in args.skip:
        bench_peer_server(gguf, sentences, throughput_texts, report)
    if "llama-cpp-python" not in args.skip:
        bench_llama_server(gguf, sentences, report)
    if "seed" not in args.skip:
        bench_seed(sentences, report)
    text = markdown(report)
    print(text)
    write_section(args.out, "serving", "## Serving (issue #15): allinone against llama.cpp's own server\n\n" + text)
    print(json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
    main()
