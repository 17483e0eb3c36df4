"""What the two ops' fuzz suites share: hypothesis settings and the refusal check."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, settings


def fuzz(max_examples: int):
    # No explain phase: it reruns a failure hundreds of times to annotate lines, which takes
    # longer than the search itself.
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_refused(invalid, call) -> None:
    """``invalid`` = (spoil, error, words): the unspoiled ``call`` runs; the spoiled one raises
    ``error`` whose message holds every one of ``words(bad)``."""
    spoil, error, words = invalid
    call()  # the unspoiled call is valid
    bad = spoil(call)
    with pytest.raises(error) as info:
        bad()
    for word in words(bad):
        assert word in str(info.value), (word, str(info.value))
