"""The web chat UI (Gradio), mounted into the server's FastAPI app at ``/ui``."""

from .chat import ChatHandlers, build_ui, model_view, mount_ui, sentiment_badge

__all__ = ["ChatHandlers", "build_ui", "model_view", "mount_ui", "sentiment_badge"]
