"""The HTTP routes, one module per area: tasks, OpenAI-compatible, sessions, system."""
