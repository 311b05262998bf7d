"""Speed of learned tasks against the same tasks by prompting, in one run (issues #10, #11).

    .venv/bin/python benchmarks/learned.py                    # sentiment, intent, ner; ~15 min on 2 cores
    .venv/bin/python benchmarks/learned.py --tasks ner --limit 50 --out /tmp/learned.md
    .venv/bin/python benchmarks/learned.py --tasks ner-zh --limit 30 --out /tmp/learned.md   # NER on MSRA

Two copies of the model are loaded in this process, one serving the learned artifacts and one
with ``learned=false`` (prompting: label scoring for classify tasks, JSON-constrained generation
for NER). They never run at once: every text is sent to one, then to the other, alternating which
goes first, so both see the same machine. Per task and path:

* one request at a time: p50 and mean milliseconds per text (``ai.run``);
* texts/s with every text submitted at once (``ai.run_many``, the engine's micro-batches, as
  ``allinone batch`` labels a file).

Texts: the first ``--limit`` rows of the task's evaluation file in ``../shared/data`` (SST-2 dev,
SNIPS, CoNLL-2003). Figures are printed and written as a section of ``docs/benchmarks.md``
(between ``<!-- learned -->`` markers). A measurement, not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from allinone import AllInOne

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402  (benchmarks/ is the script's folder)

DATA = ROOT.parent / "shared" / "data"
#: row name -> (task, evaluation file)
TASKS = {
    "sentiment": ("sentiment", "sst2_dev.jsonl"),
    "intent": ("intent", "snips_intent.jsonl"),
    "ner": ("ner", "conll2003_ner.jsonl"),
    "ner-zh": ("ner", "msra_ner.jsonl"),
}


def texts(name: str, limit: int) -> list[str]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(limit))]


def labels_of(task: str) -> dict:
    if task != "intent":
        return {}
    with open(DATA / "snips_intent_labels.jsonl", encoding="utf-8") as f:
        return {"labels": [json.loads(line)["label"] for line in f]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sentiment,intent,ner")
    parser.add_argument("--limit", type=int, default=100, help="texts per task")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    learned = AllInOne.load(args.model)
    prompted = AllInOne.load(args.model, learned=False)
    rows = []
    for row_name in args.tasks.split(","):
        task, file = TASKS[row_name]
        params = labels_of(task)
        items = texts(file, args.limit)
        method = learned.describe_task(task)["method"]
        for ai in (learned, prompted):  # warm: task prefixes cached, first-call costs paid
            ai.run(task, items[0], **params)
        times = {"learned": [], "prompted": []}
        for i, text in enumerate(items):
            order = (("learned", learned), ("prompted", prompted))
            for name, ai in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                ai.run(task, text, **params)
                times[name].append((time.perf_counter() - start) * 1000)
        rate = {}
        for name, ai in (("learned", learned), ("prompted", prompted)):
            start = time.perf_counter()
            ai.run_many(task, items, **params)
            rate[name] = len(items) / (time.perf_counter() - start)
        row = {"task": row_name, "method": method, "n": len(items)}
        for name in ("learned", "prompted"):
            row[f"{name}_p50_ms"] = round(statistics.median(times[name]), 1)
            row[f"{name}_mean_ms"] = round(statistics.fmean(times[name]), 1)
            row[f"{name}_texts_per_s"] = round(rate[name], 2)
        row["p50_speedup"] = round(row["prompted_p50_ms"] / row["learned_p50_ms"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)

    lines = [
        "## Learned tasks against prompting (same run)",
        "",
        f"`.venv/bin/python benchmarks/learned.py --tasks {args.tasks} --limit {args.limit}`: one process, the "
        "learned artifacts and `learned=false` on two copies of the model, one text at a time to each "
        "(alternating), then every text at once (`run_many`).",
        "",
        "| task | learned method | n | learned p50 / mean ms | prompted p50 / mean ms | p50 speed-up | "
        "learned texts/s | prompted texts/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['n']} | {r['learned_p50_ms']} / {r['learned_mean_ms']} | "
                     f"{r['prompted_p50_ms']} / {r['prompted_mean_ms']} | {r['p50_speedup']}x | "
                     f"{r['learned_texts_per_s']} | {r['prompted_texts_per_s']} |")
    write_section(args.out, "learned", "\n".join(lines))


if __name__ == "__main__":
    main()
