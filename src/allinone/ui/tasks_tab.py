"""The "Tasks" tab: pick any task of the registry, run it on a text, see the result.

Like the chat tab it holds no model logic: it lists ``ai.tasks`` and calls ``ai.run``, the same
calls as ``GET /v1/tasks`` and ``POST /v1/tasks/{name}``. Which parameter controls a task shows
is read from its ``input_schema`` (labels and calibration for classify tasks, span types for
NER-like tasks, length and temperature for extract and generate tasks, the prompt language for
all). The result is shown by kind: the label with probability bars (classify), highlighted spans
and a table (span extraction such as NER), lists (e.g. keywords), the streamed text (generate),
and always the raw JSON, which is the main view for a result of any other shape.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..errors import AllInOneError
from ..results import ChatResult, ClassifyResult, ExtractResult, Usage

if TYPE_CHECKING:
    from ..api import AllInOne

DEFAULT_TASK = "sentiment"
POLL_SECONDS = 2.0  # how often an open page asks again for the task list while the model loads
SPAN_HEADERS = ["text", "type", "start", "end"]
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~])")


def task_choices(ai: "AllInOne") -> list[tuple[str, str]]:
    """``(shown text, task name)`` for the dropdown: every task with its description."""
    out = []
    for info in ai.tasks.list():
        desc = info.get("description") or ""
        out.append((f"{info['name']} — {desc}" if desc else info["name"], info["name"]))
    return out


def parse_names(value: str | None) -> list[str] | dict[str, str] | None:
    """What a labels/types box holds, as the API's ``labels``/``types`` parameter.

    ``"a, b, c"`` -> ``["a", "b", "c"]``; one item per line when there is a line break, each
    optionally ``name: description`` -> ``{"name": "description", ...}``; empty -> ``None``
    (the task's own set). Duplicates are passed on as a list, for the API to reject.
    """
    if not value or not value.strip():
        return None
    items = value.splitlines() if "\n" in value.strip() else value.split(",")
    pairs = []
    for item in items:
        name, sep, desc = item.partition(":")
        if name.strip():
            pairs.append((name.strip(), desc.strip() if sep else ""))
    if not pairs:
        return None
    names = [n for n, _ in pairs]
    if any(d for _, d in pairs) and len(set(names)) == len(names):
        return dict(pairs)
    return names


def md_escape(text: str) -> str:
    """``text`` shown literally in Markdown (model output is data, not markup)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def span_tokens(text: str, spans: list[Mapping[str, Any]], type_key: str = "type") -> list[tuple[str, str | None]]:
    """The text cut into ``(piece, type or None)`` at the spans' offsets, for ``gr.HighlightedText``.
    Spans are expected sorted and not overlapping (as :class:`ExtractResult` gives them); an
    overlapping or out-of-range one is skipped."""
    out: list[tuple[str, str | None]] = []
    pos = 0
    for span in sorted(spans, key=lambda s: (s.get("start", 0), s.get("end", 0))):
        start, end = span.get("start"), span.get("end")
        if not isinstance(start, int) or not isinstance(end, int) or start < pos or end > len(text) or end <= start:
            continue
        if start > pos:
            out.append((text[pos:start], None))
        out.append((text[start:end], str(span.get(type_key))))
        pos = end
    if pos < len(text) or not out:
        out.append((text[pos:], None))
    return out


def span_table(spans: list[Mapping[str, Any]], text_key: str = "text", type_key: str = "type") -> dict[str, Any]:
    """The spans as a ``gr.Dataframe`` value: text, type, start, end."""
    return {"headers": SPAN_HEADERS,
            "data": [[s.get(text_key), s.get(type_key), s.get("start"), s.get("end")] for s in spans]}


def data_markdown(data: Mapping[str, Any]) -> str | None:
    """Lists of plain values as numbered lists and plain values as ``field: value`` lines;
    ``None`` when the data has any nested structure (the JSON view then shows it)."""
    scalar = (str, int, float, bool, type(None))
    blocks = []
    for key, value in data.items():
        if isinstance(value, scalar):
            blocks.append(f"**{md_escape(key)}**: {md_escape(json_value(value))}")
        elif isinstance(value, list) and all(isinstance(v, scalar) for v in value):
            lines = [f"**{md_escape(key)}** ({len(value)})"]
            lines += [f"{i}. {md_escape(json_value(v))}" for i, v in enumerate(value, 1)] or ["*none*"]
            blocks.append("\n".join(lines))
        else:
            return None
    return "\n\n".join(blocks) if blocks else None


def json_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def result_notes(result: Any, seconds: float) -> str:
    """One line under the result: time, tokens, and anything the user should know."""
    notes = [f"{seconds:.2f} s"]
    usage = getattr(result, "usage", None)
    if isinstance(usage, Usage):
        notes.append(f"{usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens")
    if getattr(result, "truncated", False):
        notes.append("⚠️ the text was cut to the model's input budget")
    if getattr(result, "finish_reason", None) == "length":
        notes.append("⚠️ stopped at max tokens: the output may be incomplete")
    if getattr(result, "dropped", 0):
        notes.append(f"{result.dropped} span(s) not found in the text were removed")
    if getattr(result, "repaired", False):
        notes.append("the model's JSON was repaired")
    if getattr(result, "coverage", None) is not None:
        notes.append(f"label coverage {result.coverage:.2f}")
    if getattr(result, "warning", None):
        notes.append(f"⚠️ {result.warning}")
    return " · ".join(notes)


class TaskHandlers:
    """The Tasks tab's event handlers, over a model getter (testable without a browser).

    Args:
        get_ai: returns the loaded model, or raises ``AllInOneError`` (e.g. still loading).
    """

    #: the outputs every run updates, in this order
    OUTPUTS = ("label", "spans", "table", "markdown", "json", "json_box", "notes")

    def __init__(self, get_ai: Callable[[], "AllInOne"]) -> None:
        self.get_ai = get_ai

    # -- the task list ----------------------------------------------------------------------
    def refresh(self, current: str | None = None) -> tuple:
        """The dropdown's tasks (keeping ``current`` when it still exists). Returns
        ``(dropdown, timer, info)``: while the model loads the list is empty, the info says why
        and the timer keeps asking."""
        try:
            choices = task_choices(self.get_ai())
        except AllInOneError as exc:
            return gr.update(choices=[], value=None), gr.update(active=True), f"⏳ {exc.message}"
        names = [name for _, name in choices]
        value = current if current in names else DEFAULT_TASK if DEFAULT_TASK in names else names[0] if names else None
        return gr.update(choices=choices, value=value), gr.update(active=False), gr.update()

    # -- picking a task -------------------------------------------------------------------
    def select(self, name: str | None) -> tuple:
        """Show the controls the task takes, set to its defaults, and clear the last result.

        Returns ``(info, labels, types, lang, calibrate, max_tokens, temperature, example,
        *outputs)`` updates.
        """
        hidden = gr.update(visible=False)
        cleared = self.cleared()
        if not name:
            return (gr.update(), hidden, hidden, hidden, hidden, hidden, hidden, hidden, *cleared)
        try:
            ai = self.get_ai()
            info = ai.tasks.describe(name)
            spec = ai.tasks.get(name)
        except AllInOneError as exc:
            return (f"⚠️ {exc.message}", hidden, hidden, hidden, hidden, hidden, hidden, hidden, *cleared)
        props = info["input_schema"]["properties"]
        lines = [f"**{md_escape(name)}** · {info['kind']}"
                 + (f" · languages: {', '.join(info['languages'])}" if info.get("languages") else ""),
                 md_escape(info.get("description") or "")]
        own_labels = info.get("labels") or []
        if "labels" in props:
            if own_labels:
                labels = gr.update(visible=True, value="", label="Labels (optional)",
                                   placeholder=", ".join(own_labels),
                                   info="Empty: the task's own labels. Or your own: comma-separated, "
                                        "or one per line as name: description.")
            else:
                labels = gr.update(visible=True, value="", label="Labels (required)",
                                   placeholder="e.g. BookFlight, PlayMusic, GetWeather",
                                   info="The labels to choose from: comma-separated, "
                                        "or one per line as name: description.")
        else:
            labels = hidden
        if "types" in props:
            types = gr.update(visible=True, value="", placeholder=", ".join(info.get("types") or []),
                              info="Empty: the task's own types. Or your own, comma-separated.")
        else:
            types = hidden
        default_lang = props.get("lang", {}).get("default", "auto")
        langs = list(dict.fromkeys(["auto", *info.get("languages", []), default_lang]))
        lang = gr.update(visible="lang" in props, choices=langs, value=default_lang)
        calibrate = (gr.update(visible=True, value=bool(props["calibrate"].get("default", False)))
                     if "calibrate" in props else hidden)
        # the slider ends at the server's limit; a longer declared default is cut to it
        max_tokens = (gr.update(visible=True, value=min(props["max_tokens"].get("default") or 256,
                                                        ai.settings.max_tokens_limit))
                      if "max_tokens" in props else hidden)
        temperature = (gr.update(visible=True, value=props["temperature"].get("default", 0.0))
                       if "temperature" in props else hidden)
        example = gr.update(visible=bool(spec.examples))
        return ("\n\n".join(lines), labels, types, lang, calibrate, max_tokens, temperature, example, *cleared)

    def example(self, name: str | None, lang: str | None) -> str:
        """A text from the task's own few-shot examples (in the chosen language if it has one)."""
        if not name:
            raise gr.Error("Pick a task first.")
        try:
            examples = self.get_ai().tasks.get(name).examples
        except AllInOneError as exc:
            raise gr.Error(exc.message) from None
        chosen = [ex for ex in examples if lang in (None, "auto") or ex.lang in (None, lang)] or list(examples)
        if not chosen:
            raise gr.Error(f"Task {name!r} has no example text.")
        return chosen[0].text

    # -- running ----------------------------------------------------------------------------
    def run(self, name: str | None, text: str | None, labels: str | None = None, types: str | None = None,
            lang: str | None = "auto", calibrate: bool | None = None, max_tokens: float | None = None,
            temperature: float | None = None) -> Iterator[tuple]:
        """Run the task on ``text`` with the parameters it takes; yields the output updates
        (see :attr:`OUTPUTS`): once for classify/extract tasks, as the text grows for generate.

        Raises:
            gr.Error: no task, empty text, missing labels, or any ``AllInOneError`` (a toast).
        """
        if not name:
            raise gr.Error("Pick a task first.")
        if not text or not text.strip():
            raise gr.Error("Type or paste a text first.")
        try:
            ai = self.get_ai()
            info = ai.tasks.describe(name)
            spec = ai.tasks.get(name)
        except AllInOneError as exc:
            raise gr.Error(exc.message) from None
        props = info["input_schema"]["properties"]
        params: dict[str, Any] = {}
        if "lang" in props and lang:
            params["lang"] = lang
        if "labels" in props:
            parsed = parse_names(labels)
            if parsed is None and not info.get("labels"):
                raise gr.Error(f"Task {name!r} needs labels to choose from: type them comma-separated.")
            if parsed is not None:
                params["labels"] = parsed
        if "types" in props and (parsed := parse_names(types)) is not None:
            params["types"] = parsed
        if "calibrate" in props and calibrate is not None:
            params["calibrate"] = bool(calibrate)
        if "max_tokens" in props and max_tokens is not None:
            params["max_tokens"] = int(max_tokens)
        if "temperature" in props and temperature is not None:
            params["temperature"] = float(temperature)

        start = time.perf_counter()
        if info["kind"] == "generate":
            yield from self._stream(ai, name, text, params, start)
            return
        try:
            result = ai.run(name, text, **params)
        except AllInOneError as exc:
            raise gr.Error(exc.message) from None
        yield self.show(result, text, spec, time.perf_counter() - start)

    def _stream(self, ai: "AllInOne", name: str, text: str, params: dict[str, Any], start: float) -> Iterator[tuple]:
        try:
            chunks = ai.run(name, text, stream=True, **params)
        except AllInOneError as exc:
            raise gr.Error(exc.message) from None
        received: list = []
        try:
            for chunk in chunks:
                received.append(chunk)
                yield self._outputs(markdown="".join(c.text for c in received), notes="…")
        except AllInOneError as exc:
            raise gr.Error(exc.message) from None
        finally:
            chunks.close()  # cancels generation when the page goes away mid-reply
        yield self.show(ChatResult.from_chunks(received), text, None, time.perf_counter() - start)

    def show(self, result: Any, text: str, spec: Any, seconds: float) -> tuple:
        """The output updates for a finished result (see :attr:`OUTPUTS`)."""
        raw = result.to_dict()
        notes = result_notes(result, seconds)
        if isinstance(result, ClassifyResult):
            return self._outputs(label=dict(result.scores), json=raw, notes=notes)
        if isinstance(result, ExtractResult):
            spans = getattr(spec, "spans", None)
            items = result.data.get(spans.field) if spans is not None else None
            if isinstance(items, list):
                return self._outputs(spans=span_tokens(text, items, spans.type_key),
                                     table=span_table(items, spans.text_key, spans.type_key), json=raw, notes=notes)
            markdown = data_markdown(result.data)
            if markdown is not None:
                return self._outputs(markdown=markdown, json=raw, notes=notes)
            return self._outputs(json=raw, json_open=True, notes=notes)
        if isinstance(result, ChatResult):
            return self._outputs(markdown=result.text, json=raw, notes=notes)
        return self._outputs(json=raw, json_open=True, notes=notes)  # pragma: no cover - a future kind

    @staticmethod
    def _outputs(*, label: Any = None, spans: Any = None, table: Any = None, markdown: str | None = None,
                 json: Any = None, json_open: bool = False, notes: str = "") -> tuple:
        def part(value: Any) -> Any:
            return gr.update(visible=value is not None, value=value)

        return (part(label), part(spans), part(table), part(markdown),
                gr.update(value=json), gr.update(visible=json is not None, open=json_open), notes)

    def cleared(self) -> tuple:
        return self._outputs()


def build_tasks_tab(demo: gr.Blocks, handlers: TaskHandlers, *, max_tokens_limit: int = 2048) -> None:
    """The tab's layout and events, inside ``demo`` (within its ``gr.Tab``). The task list is
    filled when a page loads, and again every few seconds while the model is still loading."""
    with gr.Row():
        with gr.Column(scale=3):
            task = gr.Dropdown(label="Task", choices=[], value=None, elem_id="task", filterable=True)
            info = gr.Markdown(elem_id="task-info")
            text = gr.Textbox(label="Text", lines=5, max_lines=20, elem_id="task-text",
                              placeholder="Type or paste a text")
            with gr.Row():
                run = gr.Button("Run", variant="primary", elem_id="task-run", scale=3)
                example = gr.Button("Example text", elem_id="task-example", scale=1, visible=False)
        with gr.Column(scale=2):
            labels = gr.Textbox(label="Labels", lines=2, visible=False, elem_id="task-labels")
            types = gr.Textbox(label="Span types", visible=False, elem_id="task-types")
            lang = gr.Dropdown(label="Prompt language", choices=["auto"], value="auto", elem_id="task-lang",
                               info="auto: detected from the text")
            calibrate = gr.Checkbox(label="Calibrate label probabilities", visible=False, elem_id="task-calibrate")
            max_tokens = gr.Slider(1, max_tokens_limit, value=256, step=1, label="Max output tokens",
                                   visible=False, elem_id="task-max-tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                    visible=False, elem_id="task-temperature")
    label = gr.Label(label="Label probabilities", num_top_classes=10, visible=False, elem_id="task-label")
    spans = gr.HighlightedText(label="Spans in the text", visible=False, elem_id="task-spans",
                               combine_adjacent=False, show_legend=False)
    table = gr.Dataframe(headers=SPAN_HEADERS, label="Spans", visible=False, interactive=False,
                         elem_id="task-table", wrap=True)
    markdown = gr.Markdown(visible=False, elem_id="task-result", container=True)
    notes = gr.Markdown(elem_id="task-notes")
    with gr.Accordion("JSON (as the HTTP API returns it)", open=False, visible=False,
                      elem_id="task-json-box") as json_box:
        json = gr.JSON(elem_id="task-json", show_label=False, open=True)
    timer = gr.Timer(POLL_SECONDS, active=False)

    outputs = [label, spans, table, markdown, json, json_box, notes]
    timer.tick(handlers.refresh, [task], [task, timer, info], show_progress="hidden")
    task.change(handlers.select, [task],
                [info, labels, types, lang, calibrate, max_tokens, temperature, example, *outputs],
                show_progress="hidden")
    example.click(handlers.example, [task, lang], [text])
    inputs = [task, text, labels, types, lang, calibrate, max_tokens, temperature]
    run.click(handlers.run, inputs, outputs)
    demo.load(handlers.refresh, [task], [task, timer, info], show_progress="hidden")
