"""apparate.runtime: the early-exit runtime."""
