"""The ``allinone`` command: thin commands over the Python API."""

from __future__ import annotations

import functools
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from .errors import AllInOneError, InvalidInputError
from .types import SamplingParams

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]
TasksDirOpt = Annotated[Optional[Path], typer.Option("--tasks-dir", help="a folder of task files (*.toml) to add")]
#: short forms of a few settings' flags
_SHORT = {"model": "-m", "backend": "-b"}


def _cli_type(annotation: Any) -> Any:
    """The CLI type of a settings field: its plain type (literals as text), optional."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str
    if typing.get_origin(annotation) in (types.UnionType, typing.Union) and len(args) == 1:
        return _cli_type(args[0])
    if typing.get_origin(annotation) is list:
        return list[str]
    return annotation


def with_settings(*, server: bool = False):
    """Give a command one option per :class:`Settings` field (generated: no hand-kept list), e.g.
    ``--n-ctx``, ``--kv-cache-mb``; ``server`` adds the serving fields. The values given reach
    the command as ``options`` (a dict of the fields set on the command line); unset ones come
    from ``ALLINONE_*`` variables or the defaults."""
    from .settings import SERVER_FIELDS, Settings

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "options"]
        names = [n for n in Settings.model_fields if n not in sig.parameters and (server or n not in SERVER_FIELDS)]
        extra = []
        for name in names:
            field = Settings.model_fields[name]
            cli_type = _cli_type(field.annotation)
            flag = "--" + name.replace("_", "-")
            decls = [f"{flag}/--no-{flag[2:]}"] if cli_type is bool else [flag]
            decls += [_SHORT[name]] if name in _SHORT else []
            hint = field.description or ""
            if typing.get_origin(field.annotation) is typing.Literal:
                hint += f" ({', '.join(map(str, typing.get_args(field.annotation)))})"
            if cli_type == list[str]:
                hint += " (repeatable)"
            option = typer.Option(*decls, help=hint, show_default=False, rich_help_panel="Settings")
            extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                           annotation=Annotated[Optional[cli_type], option]))

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            options = {n: kwargs.pop(n) for n in names if n in kwargs}
            options = {n: v for n, v in options.items() if v not in (None, [])}
            return fn(*args, options=options, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=[*own, *extra])
        wrapper.__annotations__ = {}
        return wrapper

    return decorate


def _handle_errors(fn):
    """Map every error to one line on stderr and exit code 2 (bad input) or 1 (other)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AllInOneError as exc:
            # escaped: a message may hold brackets ("pip install 'allinone[ray]'"), not markup
            err.print(f"[red]error:[/red] {escape(exc.message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if exc.status_code < 500 else 1) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])  # empty for a rule over several options
            err.print(f"[red]error:[/red] invalid option{' ' + where if where else 's'}: {first['msg']}",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _load(options: dict[str, Any], **fixed: Any):
    from .api import AllInOne
    from .settings import Settings

    settings = Settings(**{**options, **fixed})
    with err.status(f"loading {settings.model} on {settings.backend}..."):
        return AllInOne.from_settings(settings)


def _registry(options: dict[str, Any]):
    """The tasks a command can use, without loading a model (ALLINONE_TASKS_DIR applies too)."""
    from .settings import Settings
    from .tasks import TaskRegistry

    return TaskRegistry(tasks_dir=options.get("tasks_dir", Settings().tasks_dir))


def _names(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _params(pairs: Optional[list[str]], **flags: Any) -> dict[str, Any]:
    """KEY=VALUE pairs (``-p``); VALUE is read as JSON when it parses (numbers, true, lists), else
    as text. ``flags``: the task options given by name (``--max-tokens`` ...); one that is set wins
    over the same key given with ``-p``, one left unset leaves it alone."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"--param takes KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return {**out, **{k: v for k, v in flags.items() if v is not None}}


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
@with_settings()
def sentiment(
    text: Annotated[Optional[str], typer.Argument(help="the text; omit to read lines from stdin")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="a JSONL file with a 'text' field")] = None,
    as_json: JsonOpt = False, options: Optional[dict] = None,
) -> None:
    """Label text positive or negative, with probabilities (one line per text)."""
    texts = _read_texts(text, file)
    ai = _load(options)
    for t in texts:
        result = ai.sentiment(t)
        if as_json:
            _dump(result.to_dict() if len(texts) == 1 else {"text": t, **result.to_dict()})
        else:
            note = " (truncated)" if result.truncated else ""
            print(f"{result.label}\t{result.scores[result.label]:.3f}\t{t}{note}")


@app.command()
@_handle_errors
@with_settings()
def chat(
    message: Annotated[Optional[str], typer.Argument(help="answer this once; omit for an interactive chat")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    top_p: float = 0.8,
    max_tokens: Annotated[Optional[int], typer.Option(help="reply length cap in tokens; default: the default_max_tokens setting")] = None,
    seed: Optional[int] = None,
    as_json: JsonOpt = False, options: Optional[dict] = None,
) -> None:
    """Chat with the model: one answer for MESSAGE, or a REPL with streaming (/reset, /exit)."""
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
    SamplingParams.from_options(sampling)  # bad values fail before the model loads
    ai = _load(options)
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
@with_settings()
def analyze(
    text: Annotated[str, typer.Argument(help="the user's message")],
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="run these tasks instead (repeatable)")] = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    system: Annotated[Optional[str], typer.Option(help="system prompt of the reply (not with --task)")] = None,
    as_json: JsonOpt = False, options: Optional[dict] = None,
) -> None:
    """The sentiment of TEXT plus a chat reply to it; or, with --task, several tasks on TEXT."""
    if task:
        if system is not None:
            raise InvalidInputError("--system sets the reply's system prompt and cannot be used with --task",
                                    param="system")
        for name in task:
            _registry(options).get(name)  # an unknown task fails before the model loads
    ai = _load(options)
    reply_options = {"system": system} if system is not None else {}
    result = ai.analyze(text, tasks=task or None, max_tokens=max_tokens, temperature=temperature, **reply_options)
    if as_json:
        _dump(result.to_dict())
    elif task:
        for name, r in result.results.items():
            print(f"{name}: {_brief(r)}")
    else:
        s = result.sentiment
        print(f"sentiment: {s.label} ({s.scores[s.label]:.3f})")
        print(f"reply: {result.reply.text}")


def _brief(result: Any) -> str:
    """One line of a task result for people (the JSON has everything)."""
    from .results import ClassifyResult, ExtractResult

    if isinstance(result, ClassifyResult):
        return f"{result.label} ({result.scores[result.label]:.3f})"
    if isinstance(result, ExtractResult):
        return json.dumps(result.data, ensure_ascii=False)
    return result.text


@app.command()
@_handle_errors
@with_settings()
def run(
    task: Annotated[str, typer.Argument(help="the task's name (see `allinone tasks`)")],
    text: Annotated[Optional[str], typer.Argument(help="the text; omit to read lines from stdin")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="a JSONL file with a 'text' field")] = None,
    labels: Annotated[Optional[str], typer.Option(help="classify: the label set, comma-separated")] = None,
    types: Annotated[Optional[str], typer.Option(help="span tasks: the types, comma-separated")] = None,
    lang: Annotated[Optional[str], typer.Option(help="prompt language: auto, en, zh ...")] = None,
    calibrate: Annotated[Optional[bool], typer.Option("--calibrate/--no-calibrate", help="classify: contextual calibration")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="extract/generate: answer budget")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="extract/generate: 0 = greedy")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="any other task parameter, KEY=VALUE (repeatable)")] = None,
    as_json: JsonOpt = False, options: Optional[dict] = None,
) -> None:
    """Run any task (built-in or declared in a task file) on TEXT: one result per text."""
    _registry(options).get(task)  # an unknown task fails before the model loads
    params = _params(param, labels=_names(labels), types=_names(types), lang=lang, calibrate=calibrate,
                     max_tokens=max_tokens, temperature=temperature)
    texts = _read_texts(text, file)
    ai = _load(options)
    for t in texts:
        result = ai.run(task, t, **params)
        if as_json:
            _dump(result.to_dict() if len(texts) == 1 else {"text": t, **result.to_dict()})
        else:
            print(_brief(result) if len(texts) == 1 else f"{_brief(result)}\t{t}")


@app.command()
@_handle_errors
@with_settings()
def batch(
    task: Annotated[str, typer.Argument(help="the task's name (see `allinone tasks`)")],
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL, CSV or Parquet rows")],
    output: Annotated[Path, typer.Option("--output", "-o", help="results: .jsonl or .parquet")],
    format: Annotated[Optional[str], typer.Option("--format", help="the input's format when its extension does not say: jsonl, csv, parquet")] = None,
    text_field: Annotated[str, typer.Option(help="the input's text field (column)")] = "text",
    id_field: Annotated[str, typer.Option(help="the input's id field (column); without one, a row's id is its number from 0")] = "id",
    labels: Annotated[Optional[str], typer.Option(help="classify: the label set, comma-separated")] = None,
    types: Annotated[Optional[str], typer.Option(help="span tasks: the types, comma-separated")] = None,
    lang: Annotated[Optional[str], typer.Option(help="prompt language: auto, en, zh ...")] = None,
    calibrate: Annotated[Optional[bool], typer.Option("--calibrate/--no-calibrate", help="classify: contextual calibration")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="extract/generate: answer budget")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="extract/generate: 0 = greedy")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="any other task parameter, KEY=VALUE (repeatable)")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="drop an earlier output of OUTPUT (of another job too) and start over")] = False,
    chunk_rows: Annotated[int, typer.Option(help="rows per committed chunk (the most work a kill can lose)")] = 256,
    ray: Annotated[bool, typer.Option("--ray", help="run on a Ray cluster (extra: allinone\\[ray]): RAY_ADDRESS, else the one started here, else a new local one")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="run on the Ray cluster at this address (auto, HOST:PORT); implies --ray")] = None,
    actors: Annotated[Optional[int], typer.Option(help="Ray: actors, each with its own model (default: the cluster's CPUs / --cpus-per-actor)")] = None,
    cpus_per_actor: Annotated[float, typer.Option(help="Ray: CPUs (and threads) per actor")] = 1.0,
    as_json: JsonOpt = False, options: Optional[dict] = None,
) -> None:
    """Run TASK on every row of a file, resumably: run the same command again after a crash or a
    kill and it goes on where it stopped. Bad rows get an `error` and are counted; the job goes on."""
    from tqdm import tqdm

    from .batch.io import Output, Source, check_chunk_rows

    _registry(options).get(task)  # an unknown task or a bad input fails before the model loads
    check_chunk_rows(chunk_rows)
    Output(output).check_input(Source.open(input, format, text_field=text_field, id_field=id_field).path)
    params = _params(param, labels=_names(labels), types=_names(types), lang=lang, calibrate=calibrate,
                     max_tokens=max_tokens, temperature=temperature)
    bar = None

    def progress(done: int, total: Optional[int]) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=done, desc=f"batch {task}", unit="row", file=sys.stderr, disable=None,
                       dynamic_ncols=True)
        bar.update(done - bar.n)

    common = {"format": format, "text_field": text_field, "id_field": id_field, "restart": restart,
              "chunk_rows": chunk_rows, "progress": progress}
    try:
        if ray or ray_address:
            from .api import AllInOne

            summary = AllInOne.batch_on_ray(task, input, output, params=params, address=ray_address, actors=actors,
                                            cpus_per_actor=cpus_per_actor, **common, **options)
        else:
            with _load(options, request_timeout=None) as ai:
                summary = ai.batch(task, input, output, **common, **params)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        _dump(summary.to_dict())
        return
    where = f" on {summary.actors} Ray actor(s)" if summary.actors else ""
    resumed = f", {summary.resumed_from} committed before" if summary.resumed_from else ""
    print(f"{summary.output}: {summary.rows} rows ({summary.rows_ok} ok, {summary.rows_failed} failed{resumed}); "
          f"{summary.rows_run} computed in {summary.elapsed_s:.1f} s{where}, {summary.rows_per_s:.2f} rows/s, "
          f"peak RSS {summary.peak_rss_mb:.0f} MB")


@app.command()
@_handle_errors
@with_settings()
def tasks(as_json: JsonOpt = False, options: Optional[dict] = None) -> None:
    """List the tasks: built-ins plus those in the tasks folder, and how the model serves each
    (prompt, or what it learned; with --json: also the input/output schemas and the data it was fit on)."""
    from .learn.artifacts import ArtifactStore
    from .models import default_cache_dir, resolve_model
    from .settings import Settings

    settings = Settings(**options)
    registry = _registry(options)
    store = ArtifactStore(settings.cache_dir or default_cache_dir(), settings.tasks_dir)
    sha = resolve_model(settings.model, cache_dir=settings.cache_dir).fingerprint()
    rows = []
    for spec in registry:
        artifact, note = store.lookup(spec.name, sha, spec.prompt_sha256())
        row = {**registry.describe(spec.name), "method": artifact.method if artifact else "prompt",
               "learned": artifact.summary() if artifact else None}
        if note:
            row["note"] = note
        rows.append(row)
    if as_json:
        _dump(rows)
        return
    for row in rows:
        learned = row["learned"]
        how = row["method"]
        if learned:
            cv = learned.get("cv", {})
            if learned["method"] == "tagger":  # held-out span F1 of the choice; per head when heads were refit apart
                parts = {k: v["chosen"].get("f1_by_language", {}).get(k, v["chosen"]["f1"])
                         for k, v in cv.items() if isinstance(v, dict) and "chosen" in v}
                figure = ("held-out F1 " + ", ".join(f"{k} {f}" for k, f in parts.items()) if parts
                          else f"held-out F1 {cv.get('chosen', {}).get('f1')}")
            else:
                figure = f"CV macro-F1 {cv.get(learned['method'], {}).get('macro_f1')}"
            how += f" (fit on {learned['data']['file']}, {learned['data']['rows']} rows; {figure})"
        elif row.get("note"):  # a fit exists but cannot serve: say why
            how += f" ({row['note'].removesuffix(': prompting')})"
        print(f"{row['name']}\t{row['kind']}\t{how}\t{row['description']}")


@app.command()
@_handle_errors
@with_settings()
def fit(
    task: Annotated[str, typer.Argument(help="a classify task or a span task such as ner (see `allinone tasks`)")],
    data: Annotated[Optional[list[Path]], typer.Option("--data", "-d", help="JSONL rows with 'text' and 'label', or 'text' and 'entities' (repeatable)")] = None,
    method: Annotated[str, typer.Option(help="auto (best by cross-validation); classify: calibrate, head or head+logprobs; span tasks: tagger")] = "auto",
    limit: Annotated[Optional[list[int]], typer.Option(help="only the first N rows of each file; repeated: one N per --data file, in order")] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="also train on copies of 30% of the rows with an instruction appended")] = True,
    split_chars: Annotated[Optional[bool], typer.Option("--split-chars/--no-split-chars", help="span tasks: a token per CJK character (default: when any row is CJK text)")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="delete your fit of TASK for this model instead: the shipped artifact, if any, or the prompt serves it again")] = False,
    as_json: JsonOpt = False, options: Optional[dict] = None,
) -> None:
    """Learn TASK from labelled rows: every method is scored by cross-validation on the rows, the
    best is saved for this model, and every surface then serves the task with it."""
    from tqdm import tqdm

    from .learn.data import load_labelled, load_spans

    spec = _registry(options).get(task)
    if reset:
        if data:
            raise InvalidInputError("--reset takes no --data")
        undone = _load(options).reset_fit(task)
        if as_json:
            _dump(undone)
        else:
            removed = ", ".join(undone["removed"]) or f"nothing: no fit of {task} of yours for this model"
            print(f"removed {removed}; {task} is served by {undone['method']}")
        return
    if not data:
        raise InvalidInputError("give the training rows: --data FILE.jsonl (or --reset)")
    if spec.spans is not None:  # bad rows fail before the model loads
        load_spans(data, list(spec.spans.types), limit=limit)
    else:
        load_labelled(data, [lab.name for lab in spec.labels] or None, limit=limit)
    ai = _load(options, request_timeout=None)
    bar = tqdm(total=None, desc=f"fit {task}", unit="row", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        with bar:  # closed before any message below
            report = ai.fit(task, data, method=method, limit=limit, augment=augment, split_chars=split_chars,
                            progress=progress)
    except KeyboardInterrupt:
        err.print(f"interrupted: nothing was saved; what served {task} before still does", highlight=False)
        raise typer.Exit(130) from None
    if "replaces" in report:
        shipped = report["replaces"].get("data") or {}
        err.print(f"note: this fit now serves {task} instead of the one shipped with allinone (fit on "
                  f"{shipped.get('file', '?')}, {shipped.get('rows', '?')} rows); "
                  f"`allinone fit {task} --reset` goes back to it", highlight=False, soft_wrap=True)
    if as_json:
        _dump(report)
        return
    cv = report["cv"]
    print(f"{task}: {report['data']['rows']} rows ({report['seconds']} s, {report['rows_per_second']} rows/s)")
    if report["method"] == "tagger":
        from .tasks.kinds.tagger import PROMPTS

        def line(name: str, r: dict) -> None:
            langs = "".join(f"  {g} {f:.4f}" for g, f in r.get("f1_by_language", {}).items())
            lost = f"  entities lost under injection {r['entities_lost']:.4f}" if "entities_lost" in r else ""
            print(f"  {name:40} held-out P {r['precision']:.4f}  R {r['recall']:.4f}  F1 {r['f1']:.4f}{langs}{lost}")

        for variant in PROMPTS:
            if variant in cv:
                for layer, r in cv[variant]["by_layer"].items():
                    line(f"{variant} layer {layer}", r)
        chosen = cv["chosen"]
        heads = "one head per language" if chosen.get("heads", ["all"]) != ["all"] else "one head"
        print(f"  chosen: {chosen['prompt']} layer {'+'.join(map(str, chosen['layers']))}, {heads}")
    for name in ("prompt", "calibrate", "head", "head+logprobs"):
        if name in cv:
            r = cv[name]
            extra = f"  layer {'+'.join(map(str, r['layers']))}" if r.get("layers") else ""
            flip = f"  flip rate {r['flip_rate']}" if "flip_rate" in r else ""
            mark = "  <- chosen" if name == report["method"] else ""
            print(f"  {name:14} CV accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}{flip}{extra}{mark}")
    print(f"saved {report['path']}" if report["path"] else "prompting won: nothing saved")


@app.command("eval")
@_handle_errors
@with_settings()
def eval_task(
    task: Annotated[str, typer.Argument(help="the task's name, e.g. sentiment, sentiment3, intent, ner, keywords")],
    data: Annotated[Path, typer.Option("--data", "-d", help="JSONL with 'text' and 'label' / 'entities' / 'keywords'")],
    limit: Annotated[Optional[int], typer.Option(min=1, help="only the first N rows")] = None,
    labels: Annotated[Optional[str], typer.Option(help="classify: the label set, comma-separated or a file (default: the task's, else the data's)")] = None,
    types: Annotated[Optional[str], typer.Option(help="span tasks: the types, comma-separated (default: the data's)")] = None,
    lang: Annotated[Optional[str], typer.Option(help="prompt language: auto, en, zh ...")] = None,
    calibrate: Annotated[Optional[bool], typer.Option("--calibrate/--no-calibrate", help="classify: contextual calibration")] = None,
    inject: Annotated[Optional[str], typer.Option(help="classify: also measure the flip rate with this text appended")] = None,
    inject_set: Annotated[bool, typer.Option("--inject-set", help="also run every text with one of 36 injected instructions appended (flip rate; span tasks: entities lost)")] = False,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="any other task parameter, KEY=VALUE")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the report as a markdown table")] = False,
    via: Annotated[str, typer.Option(help="chat: the surface that replies: analyze (sentiment first, as the web UI) "
                                          "or chat (as /v1/chat/completions and `allinone chat`)")] = "analyze",
    as_json: JsonOpt = False, options: Optional[dict] = None,
) -> None:
    """Score a task on a labelled file: accuracy and macro-F1 (classify), span P/R/F1 (NER), F1@10
    (keywords); or, for `chat`, the replies to a prompt file (rows with 'turns'; or the built-in
    sets emotional, harmful, dev): refusal rate, language match, stop rate, loops, empty replies,
    and whether replies acknowledge a message's feeling."""
    from .eval import load_jsonl
    from .eval.runner import evaluate, metric_kind, read_labels, to_markdown
    from .tasks import kind_of

    spec = _registry(options).get(task)
    if kind_of(spec).streams:  # a generate task: score its replies
        return _eval_chat(data, limit, _params(param), options, as_json, via)
    rows = load_jsonl(data, require=("text",))
    if not rows:
        raise InvalidInputError(f"{data} has no rows")
    metric_kind(spec, rows[0])  # fail on a task/data mismatch before the model loads
    params = _params(param, lang=lang, calibrate=calibrate)
    ai = _load(options, request_timeout=None)  # an evaluation waits for every item, however busy the machine
    report = evaluate(ai, task, data, limit=limit, labels=read_labels(labels), types=_names(types),
                      params=params, inject=inject, inject_set=inject_set or None, all_rows=rows)
    if as_json:
        _dump({k: v for k, v in report.items() if not k.startswith("_")})
        return
    if markdown:
        print(to_markdown(report))
        return
    print(f"{report['model']} on {report['backend']}: {data} ({report['n']} items)")
    if "accuracy" in report:
        print(f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}")
        if "flip_rate" in report:
            extra = f", to '{report['inject_target']}' {report['flip_to_target_rate']:.4f}" if "inject_target" in report else ""
            print(f"flip rate under injection {report['flip_rate']:.4f}{extra}")
    elif "f1_at_10" in report:
        print(f"F1@10 {report['f1_at_10']:.4f}   P@10 {report['precision_at_10']:.4f}   R@10 {report['recall_at_10']:.4f}")
    else:
        print(f"precision {report['precision']:.4f}   recall {report['recall']:.4f}   F1 {report['f1']:.4f}"
              f"   (dropped {report['dropped']} spans not in the text)")
    if "injection_set" in report:
        inj = report["injection_set"]
        if "flip_rate" in inj:
            print(f"injection set ({inj['phrasings']} phrasings): flip rate {inj['flip_rate']:.4f}, to the named label "
                  f"{inj['flip_to_target_rate']:.4f}; by kind {inj['by_kind']}")
        else:
            print(f"injection set ({inj['phrasings']} phrasings): F1 {inj['f1']:.4f}, entities lost {inj['lost_rate']:.4f}")
    print(f"{report['ms_per_item']} ms/item (p50 {report['p50_ms']} ms, p95 {report['p95_ms']} ms)")
    print(to_markdown(report).split("\n\n", 1)[-1] if "\n\n" in to_markdown(report) else "")


def _eval_chat(data: Path, limit: Optional[int], params: dict, options: dict, as_json: bool, via: str) -> None:
    from .eval.chat import VIAS, evaluate_chat

    if via not in VIAS:
        raise InvalidInputError(f"--via must be one of {', '.join(VIAS)}", param="via")
    if str(data) not in ("emotional", "harmful", "dev") and not Path(data).is_file():
        raise InvalidInputError(f"no such prompt file: {data} (or use emotional, harmful, dev)")
    ai = _load(options, request_timeout=None)
    report = evaluate_chat(ai, data, limit=limit, params=params, keep_replies=as_json, via=via)
    if as_json:
        _dump(report)
        return
    model = report["model"] if report["chat_model"] == report["model"] else f"{report['model']} + {report['chat_model']} (chat)"
    print(f"{model} via {report['via']}: {report['data']} ({report['rows']} prompts, {report['replies']} replies)")
    for key in ("refusal_rate", "language_match", "stop_rate", "loop_rate", "empty_rate", "echo_rate", "acknowledge_rate",
                "as_user_rate", "misplaced_sympathy_rate", "declined_rate", "ms_first_token_p50"):
        if key in report:
            print(f"  {key:23} {report[key]}")


@app.command()
@_handle_errors
@with_settings(server=True)
def serve(
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    options: Optional[dict] = None,
) -> None:
    """Start the HTTP server: task routes, OpenAI-compatible /v1/chat/completions, the web UI at /ui.

    Flags override ALLINONE_* environment variables (prefer ALLINONE_API_KEYS to --api-keys:
    command lines are visible to other users). The model loads in the background: GET /health
    answers 503 until it is ready.
    """
    from .server import run
    from .settings import Settings

    settings = Settings(**options)
    shown = "localhost" if settings.host in {"127.0.0.1", "0.0.0.0", "::"} else settings.host
    err.print(f"allinone: http://{shown}:{settings.port}/  (API /v1, docs /docs"
              f"{', UI /ui' if settings.ui else ''}); loading {settings.model} in the background")
    run(settings, log_level=log_level)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"allinone {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                 help="Print the version and exit.")] = False) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    """The ``allinone`` command. Wrong usage (an unknown command or option, a bad value) is one
    line on stderr and exit code 2, as every other bad input (README), not click's boxed panel."""
    try:  # typer 0.2x carries its own copy of click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover - older typer runs on click itself
        from click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(args=argv, prog_name="allinone", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # bare ``allinone``: the help, as asked for
        print(exc.format_message(), file=sys.stderr)
        code = 2
    except UsageError as exc:
        where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        err.print(f"[red]error:[/red] {escape(exc.format_message().rstrip('.'))}{escape(where)}", highlight=False,
                  soft_wrap=True)
        code = 2
    except typer.Abort:
        err.print("aborted", highlight=False)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # python -m allinone.cli
    main()
