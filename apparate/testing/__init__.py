"""Helpers shared by tests/ and bench/: tolerances, the no-host-sync checker, a zoo of small
models (``apparate.testing.zoo``) and a free loopback port for servers (``ports``)."""

from apparate.testing.no_sync import HostSyncError, forbid_host_sync
from apparate.testing.tolerances import assert_confidence_close, tolerance

__all__ = ["HostSyncError", "assert_confidence_close", "forbid_host_sync", "tolerance"]
