"""bench.py runs: one step configuration and one generation measurement, each in its own process as the full
table runs them (a crash there reports an "error" row instead of numbers, so check for it)."""

import pytest
import torch

from machinery import bench


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_step_configuration_measures_and_counts_its_passes(checkpointing):
    row = bench.run_child("step", size="tiny", n=24, k=5, t=3, P=2, checkpointing=checkpointing, repeats=1)
    assert "error" not in row, row["error"] if "error" in row else ""
    # passes, from the algorithm: the base pass, then per thought <start>, L = k - 3 = 2 thought tokens and
    # <end> (k - 1 = 4 passes) and the t - 1 = 2 further teacher-forced talk passes: 1 + 2 * 6.
    assert row["passes"] == 13
    # 13 passes against 1: measured 7x to 25x the time, beyond what a busy machine's timing noise (~2x) reverses
    assert row["plain_s"] > 0 and row["qstar_s"] > row["plain_s"]
    # The ratios net of the optimizer have no stable sign at this size: AdamW alone (5 ms on one core) can outlast a
    # whole plain step (3 ms). Stable: they are the documented ratios of the measured times (float64, exact).
    fwd_bwd = row["plain_s"] - row["optimizer_s"]
    assert row["overhead_fwd_bwd"] == pytest.approx((row["qstar_s"] - row["optimizer_s"]) / (row["passes"] * fwd_bwd))
    # the recomputation floor is a plain step with checkpointing over one without; 1 when nothing is recomputed
    assert (row["plain_checkpointed_s"] is None) == (not checkpointing)
    assert row["checkpointing_floor"] == 1.0 if not checkpointing else \
        row["checkpointing_floor"] == pytest.approx((row["plain_checkpointed_s"] - row["optimizer_s"]) / fwd_bwd)


def test_generation_speed_with_and_without_thinking():
    # k - 1 = 4 more passes a token: thinking is ~5x slower. Only a change of the machine's load between the two
    # timings of one measurement can hide that (measured: plain 75 against thinking 163 tokens/s while a training
    # run started); such a measurement is taken again, at most 3 times in all.
    for _ in range(3):
        row = bench.run_child("generation", size="tiny", k=5, new_tokens=4)
        assert "error" not in row, row["error"] if "error" in row else ""
        assert row["thinking_tokens_per_s"] > 0
        if row["plain_tokens_per_s"] > row["thinking_tokens_per_s"]:
            return
    pytest.fail(f"thinking generation was not slower than plain in 3 measurements: {row}")


def test_think_at_floor_is_the_share_of_passes_tokens_left():
    # By hand: the base pass (1), then per thought <start> and L thought tokens (L + 1) and N talk passes, which
    # run at the fraction Q of positions only. M=2, L=9, N=4, Q=0.1: (1 + 2 * 14 * 0.1) / (1 + 2 * 14) = 3.8 / 29.
    assert bench.think_at_floor(2, 9, 4, 0.1) == pytest.approx(3.8 / 29)
    assert bench.think_at_floor(2, 9, 4, 1.0) == pytest.approx(1.0)           # thinking everywhere: no saving
    assert bench.think_at_floor(1, 0, 1, 0.0) == pytest.approx(1 / 3)         # no thought passes left: the base one


def test_a_think_at_measurement_reports_the_floor_of_its_chosen_positions():
    row = bench.run_child("think_at", size="tiny", n=24, k=5, t=3, P=2, fraction=0.1, repeats=1)
    assert "error" not in row, row["error"] if "error" in row else ""
    # L = k - 3 = 2, N = t = 3, M = P = 2; ceil(0.1 * 23) = 3 of the 24 positions: Q = 3/24 = 0.125.
    # (1 + 2 * (2 + 1 + 3) * 0.125) / (1 + 2 * 6) = 2.5 / 13.
    assert row["floor"] == pytest.approx(2.5 / 13)
    assert row["every_s"] > 0 and row["some_s"] > 0 and row["ratio"] == pytest.approx(row["some_s"] / row["every_s"])


def test_the_think_at_measurement_thinks_at_the_chosen_positions_only():
    """Its model must read think_at at every call: every position with "all", ceil(0.1 * 23) = 3 with entropy:0.1."""
    qs = bench.think_at_model("tiny", k=5, t=3, P=2, device=torch.device("cpu"))
    tokens, seen = torch.randint(0, 512, (1, 24)), []
    streams = qs.streams
    qs.streams = lambda *args: seen.append(args[5]) or streams(*args)        # args[5]: the positions, or None
    for think_at in ("all", "entropy:0.1"):
        qs.config.think_at = think_at
        qs(tokens)
    assert seen[0] is None and seen[1].shape == (1, 3)


def test_the_paths_measurement_times_both_paths_in_turn():
    row = bench.run_child("paths", size="tiny", n=24, k=5, t=3, P=2)
    assert "error" not in row, row["error"] if "error" in row else ""
    assert len(row["times"]["fast"]) == len(row["times"]["plain"]) == 2
    assert row["plain_over_fast"] == pytest.approx(row["plain_s"] / row["fast_s"])
    memory = bench.run_child("path_memory", size="tiny", n=24, k=5, t=3, P=2, fast_paths=False)
    assert memory["peak_gib"] > 0
