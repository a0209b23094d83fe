"""Serving: the OpenAI-compatible HTTP API, the continuous-batching model loop behind it, and the web chat page."""
