"""Progress on stderr for long work (training ramps, profiling a model)."""

from __future__ import annotations

import sys


def progress_bar(total: int, what: str, enabled: bool):
    """A progress bar on stderr with update(n) and close(): tqdm's where it is installed (it
    comes with the demo extra), else a plain counter, so training shows progress either way."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, f"apparate: {what}", enabled)
    return tqdm(total=total, desc=f"apparate: {what}", disable=not enabled, file=sys.stderr,
                leave=False)


class _PlainProgress:
    """One stderr line, rewritten in place whenever the whole percentage done changes."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self.total, self.description, self.enabled = max(total, 1), description, enabled
        self.done, self.shown = 0, -1

    def update(self, count: int = 1) -> None:
        self.done += count
        percent = 100 * self.done // self.total
        if self.enabled and percent != self.shown:
            self.shown = percent
            print(f"\r{self.description}: {self.done}/{self.total} ({percent}%)", end="",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.shown >= 0:
            print(file=sys.stderr, flush=True)
