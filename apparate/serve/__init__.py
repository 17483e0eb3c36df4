"""Serving: ``Engine`` (a runtime behind a bounded queue, one ticket per request, answered as
each sample exits), the benchmark loop that drives it at given arrival times (``loop``)."""

from apparate.serve.engine import (Answer, Cancelled, Completion, DeadlineExceeded, Engine,
                                   EngineCrashed, EngineError, EngineStopped, QueueFull, Ticket)

__all__ = ["Answer", "Cancelled", "Completion", "DeadlineExceeded", "Engine", "EngineCrashed",
           "EngineError", "EngineStopped", "QueueFull", "Ticket"]
