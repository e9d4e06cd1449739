"""machinery/content_table.py: the per-seed verdict from hand-written evaluation files."""

import json

import pytest

from machinery.content_table import main, paired_rate_difference, seed_row


def test_paired_rate_difference_by_hand():
    mean, low, high = paired_rate_difference([1, 1, 0, 0, 1], [0, 1, 0, 0, 0])
    assert mean == pytest.approx(2 / 5)                                   # two answers gained, none lost
    assert 0 <= low <= mean <= high <= 1
    assert paired_rate_difference([1, 0], [1, 0]) == (0.0, 0.0, 0.0)      # nothing changed: no spread


def row(folder, start, versus=None):
    return seed_row(folder, start, json.loads((folder / "heldout.json").read_text()), versus)


def write_run(folder, diffs, hits):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_thought_accuracy": [0.0, 0.0, 4]}) + "\n")
    (folder / "heldout.json").write_text(json.dumps({
        "answers": {"focus": {"n_windows": len(hits), "n_tokens": 2 * len(hits), "nll": {}, "diff": diffs}},
        "answer_thoughts": {"sampled_hits": hits, "answer_in_shuffled_thought": 0.0}}))
    return folder


def test_a_seed_wins_only_when_every_interval_says_so(tmp_path):
    start = {"answer_thoughts": {"sampled_hits": [0] * 40}}
    below = [-0.2, -0.3, -0.1]
    straddles = [-0.2, -0.3, 0.1]
    good = {"sampled-none": below, "sampled-filler": below, "sampled-shuffled": below, "oracle-none": below}
    assert row(write_run(tmp_path / "a", good, [1] * 20 + [0] * 20), start)["wins"]
    assert not row(write_run(tmp_path / "b", good, [0] * 40), start)["wins"]          # accuracy did not rise
    worse = good | {"sampled-shuffled": straddles}
    assert not row(write_run(tmp_path / "c", worse, [1] * 20 + [0] * 20), start)["wins"]
    with pytest.raises(ValueError, match="not the same held-out set"):
        row(write_run(tmp_path / "d", good, [1] * 3), start)
    (tmp_path / "start.json").write_text(json.dumps(start))
    assert main([str(tmp_path / "a"), "--start", str(tmp_path / "start.json"), "--out", str(tmp_path / "t.json")]) == 0
    (tmp_path / "a-step50").mkdir()
    (tmp_path / "a-step50" / "heldout.json").write_text(json.dumps(start))      # the default: <run>-step50
    assert main([str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["seeds"][0]["wins"] is True
    # the same recipe without REINFORCE on the same answers: 20 of 40 written against 10 of 40, 10 more, none lost
    versus = {"answer_thoughts": {"sampled_hits": [1] * 10 + [0] * 30}}
    assert row(tmp_path / "a", start, versus)["thought_accuracy_minus_versus"][0] == pytest.approx(0.25)
    (tmp_path / "new.json").write_text(json.dumps({"mixed": json.loads((tmp_path / "a" / "heldout.json").read_text())[
        "answers"], "answer_thoughts": {"sampled_hits": [1] * 20 + [0] * 20, "answer_in_shuffled_thought": 0.0}}))
    (tmp_path / "versus.json").write_text(json.dumps(versus))           # research/content.py's layout ("mixed")
    assert main([str(tmp_path / "a"), "--start", str(tmp_path / "start.json"), "--heldout", str(tmp_path / "new.json"),
                 "--versus", str(tmp_path / "versus.json"), "--out", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["seeds"][0]["thought_accuracy_minus_versus"][0] == 0.25
    assert main([str(tmp_path / "a"), "--start", str(tmp_path / "start.json"), "--heldout", str(tmp_path / "new.json"),
                 "--versus", str(tmp_path / "absent.json"), "--out", str(tmp_path / "t.json")]) == 0   # none: n/a
    assert json.loads((tmp_path / "t.json").read_text())["seeds"][0]["thought_accuracy_minus_versus"] is None


def test_the_accuracy_figure_is_a_standalone_svg_with_a_line_per_run_and_control(tmp_path):
    from xml.etree import ElementTree
    start = tmp_path / "start.json"
    start.write_text(json.dumps({"answer_thoughts": {"sampled_hits": [0, 1]}}))
    diffs = dict.fromkeys(("sampled-none", "sampled-filler", "sampled-shuffled", "oracle-none"), (-0.2, -0.3, -0.1))
    runs = [write_run(tmp_path / name, diffs, [1, 1]) for name in ("seed7", "seed8")]
    (runs[1] / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_thought_accuracy": [a, b, 2]}) + "\n"
                                                   for s, a, b in ((0, 0.0, 0.5), (5, 1.0, 0.0))))
    assert main([str(r) for r in runs] + ["--start", str(start), "--svg", str(tmp_path / "a.svg")]) == 0
    svg = ElementTree.parse(tmp_path / "a.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = {p.get("data-series"): p.get("points") for p in svg.iter(f"{ns}polyline")}
    assert set(lines) == {"seed7_sampled", "seed7_shuffled", "seed8_sampled", "seed8_shuffled"}
    assert len(lines["seed8_sampled"].split()) == 2 and len(lines["seed7_sampled"].split()) == 1   # one per eval
    legend = [t.text for t in svg.iter(f"{ns}text")]
    assert "seed7 sampled" in legend and "seed8 shuffled" in legend


def test_a_run_without_a_measured_start_has_no_verdict(tmp_path):
    below = [-0.2, -0.3, -0.1]
    good = dict.fromkeys(("sampled-none", "sampled-filler", "sampled-shuffled", "oracle-none"), below)
    r = row(write_run(tmp_path / "a", good, [1] * 20 + [0] * 20), None)
    assert r["wins"] is None and r["thought_accuracy_end_minus_start"] is None and r["thought_accuracy_start"] is None
    assert main([str(tmp_path / "a"), "--start", str(tmp_path / "absent.json"), "--out", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["seeds"][0]["wins"] is None


def test_first_digit_contrasts_are_carried_when_measured(tmp_path):
    diffs = dict.fromkeys(("sampled-none", "sampled-filler", "sampled-shuffled", "oracle-none"), [-0.2, -0.3, -0.1])
    folder = write_run(tmp_path / "a", diffs, [1, 0])
    held = json.loads((folder / "heldout.json").read_text())
    first = {"focus": {"diff": {"sampled-none": [-0.5, -0.9, -0.1]}}}
    held |= {"mixed_first_digit": first, "post_first_digit": first}
    assert seed_row(folder, None, held)["first_digit_diff"] == {"mixed": first["focus"]["diff"],
                                                                "post": first["focus"]["diff"]}
    assert row(folder, None)["first_digit_diff"] is None


def test_the_markdown_tables_show_each_runs_settings_contrasts_and_accuracy(tmp_path):
    below, straddles = [-0.2, -0.3, -0.1], [-0.01, -0.02, +0.01]
    diffs = dict.fromkeys(("sampled-none", "sampled-filler", "sampled-shuffled", "oracle-none"), below)
    run = write_run(tmp_path / "s7-clip", diffs | {"sampled-shuffled": straddles}, [1, 1, 0, 0])
    # a forced step (no own sample: answer_streams 0, left out), then two own steps with 1.0 and 0.5 at answers
    steps = [{"step": 1, "phase": "think", "forced_streams": 1.0, "answer_streams": 0.0, "mix_weight_answers": 0.06},
             {"step": 2, "phase": "think", "forced_streams": 0.0, "answer_streams": 1.0, "mix_weight_answers": 0.2},
             {"step": 3, "phase": "think", "forced_streams": 0.0, "answer_streams": 0.5, "mix_weight_answers": 0.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (run / "checkpoint-3").mkdir()
    (run / "latest").write_text("checkpoint-3")
    (run / "checkpoint-3" / "train_config.json").write_text(json.dumps({
        "train": {"seed": 7}, "qstar": {"think_at": "random:0.1", "n_thoughts": 16, "clip_negative_advantage": True,
                                        "policy_weight": 1.0}}))
    (tmp_path / "start.json").write_text(json.dumps({"answer_thoughts": {"sampled_hits": [0, 1, 0, 0]}}))
    (tmp_path / "versus.json").write_text(json.dumps({"answer_thoughts": {"sampled_hits": [0, 0, 0, 0]}}))
    assert main([str(run), "--start", str(tmp_path / "start.json"), "--versus", str(tmp_path / "versus.json"),
                 "--markdown", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "| s7-clip | mixed, all digits (8) | n/a | **-0.2000 [-0.3000, -0.1000]** | **-0.2000 [-0.3000, -0.1000]** " \
           "| -0.0100 [-0.0200, +0.0100] | **-0.2000 [-0.3000, -0.1000]** |" in text    # bold: interval below 0
    # accuracy 1 of 4 -> 2 of 4 (+25 points), against versus 0 of 4 (+50); streams (1.0 + 0.5) / 2; last w 0.3
    row = next(line for line in text.splitlines() if line.startswith("| s7-clip | 7 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:8] == ["random:0.1", "16", "clipped", "1.0", "0.75", "25.0% → 50.0%"]
    assert cells[9].startswith("+50.0") and cells[10:] == ["0.300", "no"]
    # a run whose streams never sit at answers (entropy chose none) has no mixing weight there, not the logged 0
    never = write_run(tmp_path / "s7-entropy", diffs, [0, 0, 0, 0])
    (never / "metrics.jsonl").write_text(json.dumps({"step": 2, "phase": "think", "forced_streams": 0.0,
                                                     "answer_streams": 0.0, "mix_weight_answers": 0.0}) + "\n")
    assert main([str(never), "--markdown", str(tmp_path / "t.md")]) == 0
    row = next(line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| s7-entropy | n/a"))
    assert [c.strip() for c in row.strip("|").split("|")][6:11:4] == ["0.00", "n/a"]


def test_a_table_is_rebuilt_from_a_committed_metrics_list_without_the_run_folder(tmp_path):
    diffs = dict.fromkeys(("sampled-none", "sampled-filler", "sampled-shuffled", "oracle-none"), [-0.2, -0.3, -0.1])
    run = write_run(tmp_path / "s7-rl", diffs, [1, 0, 1, 0])
    steps = [{"step": 4, "phase": "think", "forced_streams": 0.0, "answer_streams": 1.0, "mix_weight_answers": 0.25},
             {"step": 5, "eval_thought_accuracy": [0.5, 0.0, 4]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    assert main([str(run), "--out", str(tmp_path / "lines.json")]) == 0
    committed = tmp_path / "results"
    committed.mkdir()
    (committed / "s7-rl.json").write_text((run / "heldout.json").read_text())
    (committed / "s7-rl-metrics.json").write_text(json.dumps(steps))              # the same rows as one JSON list
    gone = tmp_path / "gone" / "s7-rl"                                            # the run folder no longer exists
    assert main([str(gone), "--heldout", str(committed / "{name}.json"), "--metrics",
                 str(committed / "{name}-metrics.json"), "--out", str(tmp_path / "list.json")]) == 0
    by_lines, by_list = (json.loads((tmp_path / f).read_text())["seeds"][0] for f in ("lines.json", "list.json"))
    assert by_list["accuracy_over_steps"] == [[5, 0.5]] and by_list["last_mix_weight_answers"] == 0.25
    # {seed}: the name up to its first '-', so that a variant (s7-rl-warm) finds its seed's start
    (committed / "s7-start.json").write_text(json.dumps({"answer_thoughts": {"sampled_hits": [0, 0, 0, 0]}}))
    (committed / "s7-rl-warm.json").write_text((run / "heldout.json").read_text())
    assert main([str(gone) + "-warm", "--heldout", str(committed / "{name}.json"), "--start",
                 str(committed / "{seed}-start.json"), "--out", str(tmp_path / "seed.json")]) == 0
    assert json.loads((tmp_path / "seed.json").read_text())["seeds"][0]["thought_accuracy_start"] == 0.0
    assert {k: v for k, v in by_list.items() if k != "run"} == {k: v for k, v in by_lines.items() if k != "run"}
    # a run whose training log is lost too: the held-out columns stay, the log's are n/a
    assert main([str(gone), "--heldout", str(committed / "{name}.json"), "--metrics", str(tmp_path / "absent.json"),
                 "--markdown", str(tmp_path / "t.md")]) == 0
    row = next(line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| s7-rl | n/a |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == "n/a" and cells[7] == "n/a → 50.0%" and cells[10] == "n/a"


def test_the_thoughts_form_is_read_when_every_thought_is_kept(tmp_path):
    diffs = dict.fromkeys(("sampled-none", "sampled-filler", "sampled-shuffled", "oracle-none"), [-0.2, -0.3, -0.1])
    folder = write_run(tmp_path / "a", diffs, [0, 1, 0, 0])
    held = json.loads((folder / "heldout.json").read_text())
    assert seed_row(folder, None, held)["thought_form"] is None                   # an older file: no thoughts
    held["answer_thoughts"]["thoughts"] = ["...77-38=", "3*5=15. Th", ".6*6=36.", "....13-9=4"]
    # two of four start with two dots or more (".6*6" has one), one of four stops at "=" before its result
    assert seed_row(folder, None, held)["thought_form"] == {"start_with_dots": 0.5, "end_at_equals": 0.25}
