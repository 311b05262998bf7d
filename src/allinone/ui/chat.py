"""The web UI: a chat tab, where every message gets its sentiment (label + emoji) and then a
streamed reply, and a "Tasks" tab that runs any task of the registry (:mod:`.tasks_tab`).

The UI holds no model logic: it calls the same :class:`~allinone.api.AllInOne` as the HTTP
routes (``analyze_stream``). The conversation is what the page shows: every message sends the
shown chat along, and the model sees exactly that (without the badges), so two tabs are two
conversations, a reload starts afresh, and clearing the chat clears what the model sees.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..errors import AllInOneError
from ..results import ClassifyResult
from .tasks_tab import TaskHandlers, build_tasks_tab

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..api import AllInOne

EMOJI = {"positive": "😊", "negative": "😞"}
UI_PATH = "/ui"


def sentiment_badge(result: ClassifyResult) -> str:
    """``"😊 positive (97%)"``: the label with its emoji and probability."""
    emoji = EMOJI.get(result.label, "🏷️")
    return f"{emoji} {result.label} ({result.scores[result.label]:.0%})"


_BADGE = re.compile(r"\n\n\*\S+ [^\n*]+ \(\d+%\)\*\Z")


def model_view(shown: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation the model sees, made from what the page shows: the same messages, in
    the same order, with the sentiment badge the UI added under each user message taken off.
    The one rule of the chat tab: the page is the history (nothing is kept on the server), so
    a cleared or edited chat is what the model gets."""
    out = []
    for m in shown or []:
        content = m.get("content")
        if isinstance(content, list):  # Gradio may send text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or m.get("role") not in ("user", "assistant"):
            continue
        if m["role"] == "user":
            content = _BADGE.sub("", content)
        out.append({"role": m["role"], "content": content})
    return out


class ChatHandlers:
    """The UI's event handlers, over a model getter (kept apart from the layout so they can be
    tested without a browser).

    Args:
        get_ai: returns the loaded model, or raises ``AllInOneError`` (e.g. still loading).
    """

    def __init__(self, get_ai: Callable[[], "AllInOne"]) -> None:
        self.get_ai = get_ai

    def respond(self, message: str, shown: list[dict[str, Any]], temperature: float,
                max_tokens: float) -> Iterator[tuple]:
        """Label ``message``, then stream the reply.

        Yields ``(textbox, shown messages, label scores)`` updates: first the user's message with
        its sentiment badge and an empty reply (the textbox emptied), then the reply as it grows
        (the textbox untouched, so a next message typed meanwhile stays). The model sees the
        conversation the page shows (:func:`model_view`).

        Raises:
            gr.Error: an empty message, or any ``AllInOneError`` (shown as a toast).
        """
        if not message or not message.strip():
            raise gr.Error("Type a message first.")
        history = model_view(shown)
        try:
            result, chunks = self.get_ai().analyze_stream(message, history, temperature=temperature,
                                                          max_tokens=int(max_tokens))
        except AllInOneError as exc:
            raise gr.Error(exc.message) from None
        badge = sentiment_badge(result)
        shown = [*(shown or []), {"role": "user", "content": f"{message}\n\n*{badge}*"},
                 {"role": "assistant", "content": ""}]
        scores = dict(result.scores)
        if result.warning:
            gr.Warning(result.warning)
        yield "", shown, scores
        reply = ""
        try:
            for chunk in chunks:
                reply += chunk.text
                shown = [*shown[:-1], {"role": "assistant", "content": reply}]  # a new list per update
                # the box is left alone: what the user types meanwhile is their next message
                yield gr.skip(), shown, scores
        except AllInOneError as exc:
            raise gr.Error(exc.message) from None
        finally:
            # Closing the stream cancels generation when the browser goes away mid-reply.
            chunks.close()

    @staticmethod
    def reset() -> tuple:
        """A new conversation: nothing shown, so nothing remembered."""
        return [], None, ""


def build_ui(get_ai: Callable[[], "AllInOne"], *, default_max_tokens: int = 1024,
             max_tokens_limit: int = 2048) -> gr.Blocks:
    """The Gradio app: the "Chat" tab, then the "Tasks" tab.

    Args:
        get_ai: returns the loaded model, or raises ``AllInOneError`` (e.g. still loading).
        default_max_tokens / max_tokens_limit: the reply-length slider's start and end (the
            latter also ends the Tasks tab's output-length slider).
    """
    handlers = ChatHandlers(get_ai)

    with gr.Blocks(title="allinone", analytics_enabled=False) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Chat", id="chat-tab", elem_id="chat-tab"):
                gr.Markdown("## allinone chat\nEach message you send is labelled **positive** or **negative**, "
                            "then the model replies.")
                chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat", feedback_options=None,
                                     buttons=["copy", "copy_all"])
                with gr.Row():
                    box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8,
                                     elem_id="message", autofocus=True, max_lines=6)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    sentiment = gr.Label(label="Sentiment of your last message", num_top_classes=2,
                                         elem_id="sentiment")
                    with gr.Column():
                        temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                        max_tokens = gr.Slider(1, max_tokens_limit, value=min(default_max_tokens, max_tokens_limit),
                                               step=1, label="Max reply tokens")
                        clear = gr.Button("New conversation", elem_id="clear")
            with gr.Tab("Tasks", id="tasks-tab", elem_id="tasks-tab"):
                gr.Markdown("## Any task\nPick a task, give it a text, and run it: the same tasks as "
                            "`GET /v1/tasks` and `POST /v1/tasks/{name}`.")
                build_tasks_tab(demo, TaskHandlers(get_ai), max_tokens_limit=max_tokens_limit)

        inputs = [box, chatbot, temperature, max_tokens]
        outputs = [box, chatbot, sentiment]
        box.submit(handlers.respond, inputs, outputs)
        send.click(handlers.respond, inputs, outputs)
        clear.click(handlers.reset, None, [chatbot, sentiment, box])
        # the chat's own trash button clears what is shown, and so what the model sees
        chatbot.clear(lambda: None, None, [sentiment])
    return demo


def mount_ui(app: "FastAPI", get_ai: Callable[[], "AllInOne"], *, default_max_tokens: int = 1024,
             max_tokens_limit: int = 2048) -> None:
    """Mount the UI at ``/ui`` of ``app``. Access control is the server's (its key check
    guards every path under ``/ui``).

    Args:
        get_ai: returns the loaded model, or raises ``AllInOneError`` (e.g. still loading).
    """
    demo = build_ui(get_ai, default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit)
    gr.mount_gradio_app(app, demo, path=UI_PATH, footer_links=[], run_history=False, ssr_mode=False,
                        mcp_server=False)
