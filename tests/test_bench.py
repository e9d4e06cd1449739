"""bench.py runs: one step configuration and one generation measurement, each in its own process as the full
table runs them (a crash there reports an "error" row instead of numbers, so check for it)."""

import pytest

from machinery import bench


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_step_configuration_measures_and_counts_its_passes(checkpointing):
    row = bench.run_child("step", size="tiny", n=24, k=5, t=3, P=2, checkpointing=checkpointing, repeats=1)
    assert "error" not in row, row["error"] if "error" in row else ""
    # passes, from the algorithm: the base pass, then per thought <start>, L = k - 3 = 2 thought tokens and
    # <end> (k - 1 = 4 passes) and the t - 1 = 2 further teacher-forced talk passes: 1 + 2 * 6.
    assert row["passes"] == 13
    assert row["plain_s"] > 0 and row["qstar_s"] > row["plain_s"] and row["overhead_fwd_bwd"] > 0
    # the recomputation floor is a plain step with checkpointing over one without; 1 when nothing is recomputed
    assert (row["plain_checkpointed_s"] is None) == (not checkpointing)
    assert row["checkpointing_floor"] == 1.0 if not checkpointing else row["checkpointing_floor"] > 0


def test_generation_speed_with_and_without_thinking():
    row = bench.run_child("generation", size="tiny", k=5, new_tokens=4)
    assert "error" not in row, row["error"] if "error" in row else ""
    assert row["plain_tokens_per_s"] > row["thinking_tokens_per_s"] > 0
