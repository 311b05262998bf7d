"""Time to first token by turn of a conversation, with or without a pause between turns.

    .venv/bin/python benchmarks/turns.py [--think 1.5] [--rounds 1]

Starts `allinone serve` (embedded model, llama.cpp) on a free port and holds the conversations
of ``benchmarks/serving.py`` (one per topic of ``TURN_TOPICS``, 10 turns of ~20 tokens, replies of
at most 48 tokens, greedy), waiting ``--think`` seconds after each reply as a reader would
(``serving.py`` sends the next turn at once). Prints one JSON line per round: the median time
to first token of each turn in ms, turn 10 / turn 1, and the median of turns 2-10. Run it on an
idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serving  # noqa: E402  (the server, client and topics of the serving benchmark)


def conversations(base: str, think: float, round_no: int) -> list[float]:
    runs = []
    for topic in serving.TURN_TOPICS:
        turns, history = [], []
        # a round's own words: a later round repeating the first would find its turns cached
        name = topic if round_no == 0 else f"{topic} (round {round_no + 1})"
        for i in range(10):
            history.append({"role": "user", "content": f"{name}, turn {i + 1}: tell me one more fact."})
            ttft, _, _, text = serving.stream_chat(base, history, max_tokens=48)
            history.append({"role": "assistant", "content": text})
            turns.append(1000 * ttft)
            time.sleep(think)
        runs.append(turns)
    return [statistics.median(run[i] for run in runs) for i in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--think", type=float, default=0.0, help="seconds between a reply and the next turn")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    port = serving.free_port()
    with serving.server(serving.allinone_cmd("llamacpp", port), port, "/health") as (base, _):
        serving.stream_chat(base, [{"role": "user", "content": "warm up"}], max_tokens=8)
        for round_no in range(args.rounds):
            turns = conversations(base, args.think, round_no)
            print(json.dumps({"think_s": args.think, "ttft_ms_by_turn": [round(x, 1) for x in turns],
                              "turn10_over_turn1": round(turns[9] / turns[0], 3),
                              "median_turns_2_10_ms": round(statistics.median(turns[1:]), 1)}), flush=True)


if __name__ == "__main__":
    main()
