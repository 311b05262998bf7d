"""Engine figures for one backend: load time, chat time-to-first-token and decode speed, peak RSS.

    .venv/bin/python benchmarks/engine.py --backend llamacpp [--model embedded]

Decode tokens/s counts completion tokens after the first one, divided by the time after the
first token arrived (so prompt processing is excluded). Greedy decoding, fixed prompts.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

from allinone import AllInOne

PROMPTS = [
    "Write a short paragraph about the history of the bicycle.",
    "用三句话介绍一下杭州西湖。",
    "Explain what a hash table is to a beginner.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    ai = AllInOne.load(args.model, backend=args.backend)
    ai.chat("warm up", max_tokens=4, temperature=0)
    ttfts, rates = [], []
    for prompt in PROMPTS:
        start = time.perf_counter()
        first = None
        n = 0
        for chunk in ai.chat(prompt, stream=True, temperature=0, max_tokens=args.max_tokens):
            if first is None and chunk.text:
                first = time.perf_counter()
            if chunk.usage:
                n = chunk.usage.completion_tokens
        end = time.perf_counter()
        ttfts.append(first - start)
        rates.append((n - 1) / (end - first))
    figures = {
        "model": ai.model_id, "backend": ai.backend_name, "load_seconds": round(ai.load_seconds, 2),
        "ttft_ms_median": round(1000 * statistics.median(ttfts), 1),
        "decode_tokens_per_s_median": round(statistics.median(rates), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
    }
    print(json.dumps(figures, ensure_ascii=False))


if __name__ == "__main__":
    main()
