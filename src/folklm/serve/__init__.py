"""The OpenAI-compatible HTTP server (``app.build_app``) and its web chat."""
