"""Serving: the real-time batching loop, engines, and the end-to-end experiment."""
