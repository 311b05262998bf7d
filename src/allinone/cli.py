"""The ``allinone`` command: thin commands over the Python API."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from .errors import AllInOneError, InvalidInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
eval_app = typer.Typer(no_args_is_help=True, help="Measure a task on a labelled JSONL file.")
app.add_typer(eval_app, name="eval")
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="embedded, embedded-1.5b, a .gguf, an HF folder or a Hub id")]
BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="auto, llamacpp or transformers")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]


def _handle_errors(fn):
    """Map every error to one line on stderr and exit code 2 (bad input) or 1 (other)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AllInOneError as exc:
            err.print(f"[red]error:[/red] {exc.message}", highlight=False)
            raise typer.Exit(2 if exc.status_code < 500 else 1) from None
        except ValidationError as exc:
            err.print(f"[red]error:[/red] invalid option: {exc.errors()[0]['msg']} ({exc.errors()[0]['loc']})")
            raise typer.Exit(2) from None

    return wrapper


def _load(model: str, backend: str):
    from .api import AllInOne

    with err.status(f"loading {model} on {backend}..."):
        return AllInOne.load(model=model, backend=backend)


def _dump(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def _read_texts(text: Optional[str], file: Optional[Path]) -> list[str]:
    if text is not None:
        return [text]
    if file is not None:
        from .eval import load_jsonl

        return [row["text"] for row in load_jsonl(file, require=("text",))]
    if sys.stdin.isatty():
        raise InvalidInputError("give TEXT, --file FILE.jsonl, or lines on standard input")
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


@app.command()
@_handle_errors
def sentiment(
    text: Annotated[Optional[str], typer.Argument(help="the text; omit to read lines from stdin")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="a JSONL file with a 'text' field")] = None,
    model: ModelOpt = "embedded", backend: BackendOpt = "auto", as_json: JsonOpt = False,
) -> None:
    """Label text positive or negative, with probabilities (one line per text)."""
    texts = _read_texts(text, file)
    ai = _load(model, backend)
    for t in texts:
        result = ai.sentiment(t)
        if as_json:
            _dump(result.to_dict() if len(texts) == 1 else {"text": t, **result.to_dict()})
        else:
            note = " (truncated)" if result.truncated else ""
            print(f"{result.label}\t{result.scores[result.label]:.3f}\t{t}{note}")


@app.command()
@_handle_errors
def chat(
    message: Annotated[Optional[str], typer.Argument(help="answer this once; omit for an interactive chat")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    top_p: float = 0.8,
    max_tokens: int = 512,
    seed: Optional[int] = None,
    model: ModelOpt = "embedded", backend: BackendOpt = "auto", as_json: JsonOpt = False,
) -> None:
    """Chat with the model: one answer for MESSAGE, or a REPL with streaming (/reset, /exit)."""
    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    ai = _load(model, backend)
    if message is not None:
        if as_json:
            _dump(ai.chat(message, system=system, **sampling).to_dict())
        else:
            _print_stream(ai.chat(message, system=system, stream=True, **sampling))
        return
    history: list[dict[str, str]] = []
    err.print("[dim]Type a message; /reset clears the history, /exit or Ctrl-D quits.[/dim]")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in {"/exit", "/quit"}:
            return
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        try:
            reply = _print_stream(ai.chat(history, system=system, stream=True, **sampling))
        except AllInOneError as exc:
            history.pop()
            err.print(f"[red]error:[/red] {exc.message}")
            continue
        history.append({"role": "assistant", "content": reply})


def _print_stream(chunks) -> str:
    parts = []
    for chunk in chunks:
        print(chunk.text, end="", flush=True)
        parts.append(chunk.text)
    print()
    return "".join(parts)


@app.command()
@_handle_errors
def analyze(
    text: Annotated[str, typer.Argument(help="the user's message")],
    max_tokens: int = 256,
    temperature: float = 0.7,
    model: ModelOpt = "embedded", backend: BackendOpt = "auto", as_json: JsonOpt = False,
) -> None:
    """The sentiment of TEXT plus a chat reply to it."""
    ai = _load(model, backend)
    result = ai.analyze(text, max_tokens=max_tokens, temperature=temperature)
    if as_json:
        _dump(result.to_dict())
    else:
        s = result.sentiment
        print(f"sentiment: {s.label} ({s.scores[s.label]:.3f})")
        print(f"reply: {result.reply.text}")


@eval_app.command("sentiment")
@_handle_errors
def eval_sentiment(
    data: Annotated[Path, typer.Option("--data", "-d", help="JSONL with 'text' and 'label' fields")],
    limit: Annotated[Optional[int], typer.Option(help="only the first N rows")] = None,
    model: ModelOpt = "embedded", backend: BackendOpt = "auto", as_json: JsonOpt = False,
) -> None:
    """Accuracy, macro-F1, confusion matrix and ms/item of the sentiment task on a labelled file."""
    from tqdm import tqdm

    from .eval import classification_report, load_jsonl
    from .tasks import SENTIMENT

    rows = load_jsonl(data, limit=limit, require=("text", "label"))
    if not rows:
        raise InvalidInputError(f"{data} has no rows")
    ai = _load(model, backend)
    gold, pred, seconds = [], [], []
    for row in tqdm(rows, desc="sentiment", unit="item", file=sys.stderr, disable=None):
        start = time.perf_counter()
        result = ai.sentiment(row["text"])
        seconds.append(time.perf_counter() - start)
        gold.append(str(row["label"]))
        pred.append(result.label)
    report = classification_report(gold, pred, labels=SENTIMENT.labels)
    seconds.sort()
    summary = {
        "task": "sentiment", "data": str(data), "model": ai.model_id, "backend": ai.backend_name,
        "n": report.n, "accuracy": round(report.accuracy, 4), "macro_f1": round(report.macro_f1, 4),
        "ms_per_item": round(1000 * sum(seconds) / len(seconds), 1),
        "p50_ms": round(1000 * seconds[len(seconds) // 2], 1),
        "p95_ms": round(1000 * seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))], 1),
        "load_seconds": round(ai.load_seconds, 2),
        "confusion": report.confusion,
    }
    if as_json:
        _dump(summary)
        return
    print(f"{summary['model']} on {summary['backend']}: {data} ({report.n} items)")
    print(f"accuracy {report.accuracy:.4f}   macro-F1 {report.macro_f1:.4f}")
    print(f"{summary['ms_per_item']} ms/item (p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms)")
    print(report.confusion_table())


def main() -> None:  # pragma: no cover
    app()
