"""Serving: the real-time batching loop and its engines (the unmodified model, the runtime)."""
