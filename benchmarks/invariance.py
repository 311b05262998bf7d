"""Label probabilities alone vs in a batch, and greedy replies alone vs at once (issue #12).

    .venv/bin/python benchmarks/invariance.py                  # 48 texts per task, both modes; ~20 min
    .venv/bin/python benchmarks/invariance.py --limit 8 --modes invariant
    .venv/bin/python benchmarks/invariance.py --replies-only   # the harder reply probe; ~5 min

For each mode (the default, and ``batch_invariant=True``) and each path (learned artifacts, and
prompting with ``learned=False``): the first ``--limit`` texts of the SST-2 and SNIPS training
pools, each run alone with ``ai.run``, then all at once with ``ai.run_many``; one JSON line with
the largest and median absolute difference of a label's probability, how many texts differ by
more than 1e-3, label changes, and the seconds each way. With prompting, 8 greedy chat replies
(48 tokens) one by one, then from 8 threads at once, then one by one again: how many are equal.
Run it with nothing else on the CPU (the times are part of the result); figures are in
docs/reliability.md.

``--replies-only``: the harder reply probe instead: 8 prompts that ask for ~100 tokens
(``max_tokens=96``), after ``--limit`` sentiment texts in a batch; one by one, then 8 at once
from threads, then one by one again; how many replies are equal each way.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import time
from pathlib import Path

from allinone import AllInOne

POOLS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "train"
PROMPTS = ["Name three fruits.", "用一句话介绍北京。", "What is 2+2?", "Say hi in French.",
           "推荐一本书。", "Give me a color.", "What day comes after Monday?", "写一个四个字的成语。"]
LONG_PROMPTS = ["Explain how a bicycle works in detail.", "用三段话介绍一下长城的历史。",
                "Write a short story about a robot who learns to paint.",
                "List ten tips for better sleep and explain each.", "请详细解释什么是机器学习。",
                "Describe the water cycle step by step.", "写一篇关于春天的短文。",
                "Compare Python and JavaScript for a beginner."]


def rows(name: str, limit: int) -> list[dict]:
    with open(POOLS / name, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(limit))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=48, help="texts per task")
    parser.add_argument("--modes", default="default,invariant")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--backend", default="llamacpp", choices=["llamacpp", "transformers"])
    parser.add_argument("--replies-only", action="store_true", help="only the harder greedy-reply probe")
    args = parser.parse_args()
    if args.replies_only:
        return replies(args)

    sentiment = [r["text"] for r in rows("sst2_train.jsonl", args.limit)]
    intent = [r["text"] for r in rows("snips_intent_train.jsonl", args.limit)]
    with open(POOLS / "snips_intent_train.jsonl", encoding="utf-8") as f:
        labels = sorted({json.loads(line)["label"] for line in f})
    for mode in args.modes.split(","):
        for learned in (True, False):
            with AllInOne.load(args.model, backend=args.backend, learned=learned,
                               batch_invariant=mode == "invariant") as ai:
                for task, items, params in (("sentiment", sentiment, {}), ("intent", intent, {"labels": labels})):
                    start = time.perf_counter()
                    alone = [ai.run(task, t, **params).scores for t in items]
                    middle = time.perf_counter()
                    batch = [r.scores for r in ai.run_many(task, items, **params)]
                    end = time.perf_counter()
                    diffs = [max(abs(a[k] - b[k]) for k in a) for a, b in zip(alone, batch)]
                    print(json.dumps({
                        "mode": mode, "learned": learned, "task": task, "n": len(items),
                        "max_abs_diff": max(diffs), "median_abs_diff": statistics.median(diffs),
                        "over_1e-3": sum(d > 1e-3 for d in diffs),
                        "label_changes": sum(max(a, key=a.get) != max(b, key=b.get) for a, b in zip(alone, batch)),
                        "alone_s": round(middle - start, 1), "batch_s": round(end - middle, 1)}), flush=True)
                if not learned:
                    print(json.dumps({"mode": mode, **greedy_probe(ai, PROMPTS, 48)}), flush=True)

def replies(args: argparse.Namespace) -> None:
    sentiment = [r["text"] for r in rows("sst2_train.jsonl", args.limit)]
    for mode in args.modes.split(","):
        with AllInOne.load(args.model, backend=args.backend, batch_invariant=mode == "invariant") as ai:
            ai.run_many("sentiment", sentiment)  # other work cached first
            print(json.dumps({"backend": args.backend, "mode": mode, **greedy_probe(ai, LONG_PROMPTS, 96)}), flush=True)


def greedy_probe(ai: AllInOne, prompts: list[str], max_tokens: int) -> dict:
    """Greedy replies to ``prompts`` one by one, then from one thread each at once, then one by
    one again: how many are equal each way, and the seconds of the first two passes."""
    def reply(prompt: str) -> str:
        return ai.chat(prompt, temperature=0, max_tokens=max_tokens).text

    start = time.perf_counter()
    alone = [reply(p) for p in prompts]
    middle = time.perf_counter()
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        at_once = list(pool.map(reply, prompts))
    end = time.perf_counter()
    again = [reply(p) for p in prompts]
    return {"alone_eq_at_once": sum(a == b for a, b in zip(alone, at_once)),
            "alone_eq_again": sum(a == b for a, b in zip(alone, again)), "of": len(prompts),
            "alone_s": round(middle - start, 1), "at_once_s": round(end - middle, 1)}

if __name__ == "__main__":
    main()
