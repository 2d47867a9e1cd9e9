"""The sequencer's pacing: a quiet log is looked at every poll, a busy one in larger batches."""

from __future__ import annotations

import pytest

from pgws_sync.sources.sequencer import FILL, MAX_STRETCH, pause


@pytest.mark.parametrize("numbered, stretch", [
    (0, 1.0), (1, 1.0), (FILL, 1.0), (2 * FILL, 2.0), (3 * FILL, 3.0), (1000, MAX_STRETCH)])
def test_the_wait_grows_with_what_a_call_numbered_up_to_the_cap(numbered, stretch):
    assert pause(0.005, numbered) == pytest.approx(0.005 * stretch)
