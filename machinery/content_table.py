"""Does the thought's content help? The per-seed table of README's "Does thinking help?", from finished runs.

    python -m machinery.content_table out-1337 out-1 out-2 --out results/content_seeds.json --svg accuracy.svg

Each run folder holds metrics.jsonl (train.py; --metrics reads it from elsewhere, such as the JSON lists committed
in results/, so that a table is rebuilt without the run folders) and heldout.json, written by
    python -m research.content --model <run> --limit 400 --seq_len 64 --out <run>/heldout.json
(built-in problems from a seed no training run uses: eval.HELDOUT_SEED; runs measured before research/content.py
existed hold the same measures under "answers", written by eval.py's nll task). The start: the same command on the
run's checkpoint before thinking began (--start, default <run>-step50/heldout.json), on the same answers, so that
end - start is a paired difference (bootstrap over answers). The table shows the mixed prediction's contrasts and,
where measured, the post-thought prediction's ("post").

--svg draws each run's thought accuracy over its training steps (train.py's evaluations) beside the same fraction
for another problem's thought (dashed), as a standalone SVG file. --markdown writes the tables of docs/results.md:
every predictor's contrasts per run (the start's once per plain checkpoint), each run's settings and thought
accuracy, and its first held-out thoughts.

A seed wins when sampled - none, sampled - filler and sampled - shuffled on the bare answers all have 95% intervals
below 0, and the thought accuracy rose with an interval above 0.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from machinery.thoughts_page import PALETTE, _chart, _esc


def paired_rate_difference(end: list[int], start: list[int], n_boot: int = 2000, seed: int = 0):
    """Mean of end - start over the same answers, with a 95% bootstrap interval. -> (mean, low, high)"""
    d = np.asarray(end, dtype=float) - np.asarray(start, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    low, high = np.quantile(d[picks].mean(axis=1), [0.025, 0.975])
    return float(d.mean()), float(low), float(high)


PREDICTORS = {"mixed": "mixed, all digits", "mixed_first_digit": "mixed, first digit", "post": "post, all digits",
              "post_first_digit": "post, first digit"}
SETTINGS = ("seed", "think_at", "n_thoughts", "clip_negative_advantage", "policy_weight")


def predictors(held: dict) -> dict:
    """research/content.py's file -> {predictor: {n_tokens, nll_none, diff}} for each one it measured."""
    if "answers" in held:                                          # eval.py's older layout: the mixed one only
        held = {"mixed": held["answers"]}
    return {key: {"n_tokens": held[key]["focus"]["n_tokens"], "nll_none": held[key]["focus"]["nll"].get("none"),
                  "diff": held[key]["focus"]["diff"]} for key in PREDICTORS if key in held}


def run_settings(run: Path) -> dict | None:
    """The settings that tell runs of one recipe apart, from the last checkpoint's train_config.json (None if absent)."""
    latest = run / "latest"
    path = run / latest.read_text().strip() / "train_config.json" if latest.exists() else None
    if path is None or not path.exists():
        return None
    config = json.loads(path.read_text())
    config = config.get("train", {}) | config.get("qstar", {})
    return {key: config.get(key) for key in SETTINGS}


def read_metrics(path: Path) -> list[dict]:
    """train.py's metrics.jsonl, or the same rows as one JSON list (results/*-metrics.json); [] if absent."""
    if not path.exists():
        return []
    text = path.read_text()
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()]


def seed_row(run: Path, start: dict | None, held: dict, versus: dict | None = None,
             rows: list[dict] | None = None) -> dict:
    """One run's row; start None (not measured): no accuracy change from the start, and "wins" is None. "meets":
    sampled - none, - filler and - shuffled (mixed, every digit) all have 95% intervals below 0. rows: the run's
    metrics (default: <run>/metrics.jsonl; none: the columns taken from training's log are n/a)."""
    rows = read_metrics(run / "metrics.jsonl") if rows is None else rows
    focus = (held["answers"] if "answers" in held else held["mixed"])["focus"]
    post = held["post"]["focus"]["diff"] if "post" in held else None
    hits = held["answer_thoughts"]["sampled_hits"]
    start_hits = start["answer_thoughts"]["sampled_hits"] if start else None
    if start_hits is not None and len(hits) != len(start_hits):
        raise ValueError(f"{run}: {len(hits)} answers, the start has {len(start_hits)}: not the same held-out set")
    accuracy = paired_rate_difference(hits, start_hits) if start_hits is not None else None
    diffs = focus["diff"]
    below = all(diffs[k][2] < 0 for k in ("sampled-none", "sampled-filler", "sampled-shuffled"))
    wins = below and accuracy[1] > 0 if accuracy else None
    thinking = [r for r in rows if r.get("phase") == "think"]
    at_answers = [r["mix_weight_answers"] for r in thinking if "mix_weight_answers" in r
                  and (r.get("answer_streams") or r.get("forced_streams"))]     # a step with streams at answers
    answer_streams = [r["answer_streams"] for r in thinking if "answer_streams" in r
                      and not r.get("forced_streams")]                     # after the warm start: own samples only
    first = {name: held[f"{name}_first_digit"]["focus"]["diff"] for name in ("mixed", "post")
             if f"{name}_first_digit" in held}
    evals = [r for r in rows if "eval_thought_accuracy" in r]
    thoughts = held["answer_thoughts"].get("thoughts")                # every thought, in newer files only
    form = {"start_with_dots": float(np.mean([t.startswith("..") for t in thoughts])),      # filler before the step
            "end_at_equals": float(np.mean([t.rstrip().endswith("=") for t in thoughts]))} if thoughts else None
    agreement = [r["reward_agreement"] for r in thinking if "reward_agreement" in r]
    return {"run": str(run), "answers": focus["n_windows"], "answer_tokens": focus["n_tokens"], "nll": focus["nll"],
            "diff": diffs, "post_diff": post, "first_digit_diff": first or None,
            "thought_accuracy_start": float(np.mean(start_hits)) if start_hits is not None else None,
            "thought_accuracy_end": float(np.mean(hits)), "thought_accuracy_end_minus_start": accuracy,
            "shuffled_thought_accuracy_end": held["answer_thoughts"]["answer_in_shuffled_thought"],
            "content_reward": held.get("content_reward"), "answers_selected": held.get("answers_selected"),
            "accuracy_over_steps": [(r["step"], r["eval_thought_accuracy"][0]) for r in evals],
            "shuffled_accuracy_over_steps": [(r["step"], r["eval_thought_accuracy"][1]) for r in evals],
            "oracle_minus_none_over_steps": [(r["step"], r["eval_answer_diff"]["oracle-none"][0]) for r in evals
                                             if "oracle-none" in r.get("eval_answer_diff", {})],
            "last_mix_weight": thinking[-1].get("mix_weight_mean") if thinking else None,
            "reward_agreement_mean": float(np.mean(agreement)) if agreement else None, "wins": wins, "meets": below,
            "last_mix_weight_answers": at_answers[-1] if at_answers else None,
            "answer_streams_mean": float(np.mean(answer_streams)) if answer_streams else None,
            "settings": run_settings(run), "predictors": predictors(held),
            "start_predictors": (predictors(start) or None) if start else None,
            "thought_form": form,
            "examples": [(e["thought"], e["answer"]) for e in held["answer_thoughts"].get("examples", [])[:8]],
            "thought_accuracy_minus_versus": paired_rate_difference(hits, versus["answer_thoughts"]["sampled_hits"])
            if versus else None}


def accuracy_svg(table: list[dict], title: str) -> str:
    """One standalone SVG: per run, thought accuracy over steps (solid) and another problem's thought's (dashed),
    drawn by the thoughts page's chart (a colour per run), with the legend as SVG text on the right."""
    series, legend = {}, []
    for i, r in enumerate(table):
        name, color = Path(r["run"]).name, PALETTE[i % len(PALETTE)]
        series[f"{name}_sampled"] = r["accuracy_over_steps"]
        series[f"{name}_shuffled"] = r["shuffled_accuracy_over_steps"]
        for j, (kind, dash) in enumerate((("sampled", ""), ("shuffled", ' stroke-dasharray="8 3 2 3"'))):
            y = 44 + 16 * (2 * i + j)
            legend.append(f'<line x1="520" x2="544" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>'
                          f'<text x="550" y="{y + 4}">{_esc(name)} {kind}</text>')
    figure = _chart(title, series, w=700, right=190, h=max(250, 60 + 32 * len(table)))   # room for the legend
    svg = figure[len("<figure>"):figure.index("</svg>")]
    return svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1) + "".join(legend) + "</svg>\n"


def interval(v) -> str:
    return f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]"


def markdown(table: list[dict]) -> str:
    """docs/results.md's tables from the rows: contrasts per predictor (bold: the 95% interval lies below 0), then
    settings and thought accuracy per run, then each run's first held-out thoughts."""
    def cell(v, pct=False):
        if v is None:
            return "n/a"
        text = f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]" if pct else interval(v)
        return text if pct or v[2] >= 0 else f"**{text}**"
    lines = ["| run | predictor, tokens scored | NLL none | sampled − none | sampled − filler | sampled − shuffled "
             "| oracle − none |", "|---|---|---|---|---|---|---|"]
    starts_shown = set()
    for r in table:
        name, prefix = Path(r["run"]).name, Path(r["run"]).name.rpartition("-")[0]
        blocks = [(name, r["predictors"])]
        if r.get("start_predictors") and prefix not in starts_shown:
            starts_shown.add(prefix)
            blocks.insert(0, (f"{prefix} start", r["start_predictors"]))
        for label, preds in blocks:
            for key, p in preds.items():
                d = p["diff"]
                nll = f"{p['nll_none']:.4f}" if p["nll_none"] is not None else "n/a"
                lines.append(f"| {label} | {PREDICTORS[key]} ({p['n_tokens']}) | {nll} | " + " | ".join(
                    cell(d.get(k)) for k in ("sampled-none", "sampled-filler", "sampled-shuffled", "oracle-none")) + " |")
    lines += ["", "| run | seed | think at | thoughts | negative advantages | REINFORCE weight | streams at answers "
              "| thought writes the answer: start → end | end − start, points [95%] | − versus, points [95%] "
              "| mixing weight at answers, last step | three contrasts below 0 |", "|" + "---|" * 12]
    for r in table:
        s = {k: "n/a" if v is None else v for k, v in (r.get("settings") or dict.fromkeys(SETTINGS)).items()}
        start = f"{100 * r['thought_accuracy_start']:.1f}%" if r["thought_accuracy_start"] is not None else "n/a"
        negative = {True: "clipped", False: "kept", "n/a": "n/a"}[s["clip_negative_advantage"]]
        streams = f"{r['answer_streams_mean']:.2f}" if r.get("answer_streams_mean") is not None else "n/a"
        weight = f"{r['last_mix_weight_answers']:.3f}" if r.get("last_mix_weight_answers") is not None else "n/a"
        lines.append(f"| {Path(r['run']).name} | {s['seed']} | {s['think_at']} | {s['n_thoughts']} | {negative} | "
                     f"{s['policy_weight']} | {streams} | {start} → {100 * r['thought_accuracy_end']:.1f}% | "
                     f"{cell(r['thought_accuracy_end_minus_start'], True)} | "
                     f"{cell(r['thought_accuracy_minus_versus'], True)} | {weight} | {'yes' if r['meets'] else 'no'} |")
    for r in table:
        if r.get("examples"):
            shown = ", ".join(f"`{t.replace(chr(10), '⏎')}` before {a.strip()}" for t, a in r["examples"])
            lines += ["", f"{Path(r['run']).name}, the first {len(r['examples'])} held-out answers: {shown}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, each with metrics.jsonl and heldout.json")
    parser.add_argument("--start", default="{run}-step50/heldout.json",
                        help="the held-out JSON before thinking began (a run without one has no accuracy change); "
                             "{run} is the run folder, {name} its name, {prefix} its name up to the last '-' and "
                             "{seed} up to the first (default: %(default)s)")
    parser.add_argument("--heldout", default="{run}/heldout.json", help="the run's held-out JSON (default: %(default)s)")
    parser.add_argument("--metrics", default="{run}/metrics.jsonl", help="the run's training log, JSON lines or one "
                        "JSON list; absent: the columns taken from it are n/a (default: %(default)s)")
    parser.add_argument("--versus", default=None, help="another run's held-out JSON on the same answers (e.g. the "
                        "same recipe without REINFORCE): the paired difference in thought accuracy; a run without "
                        "one: n/a")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument("--svg", type=Path, default=None, help="draw thought accuracy over steps here (SVG)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown here")
    args = parser.parse_args(argv)
    def path(pattern: str, run: Path) -> Path:
        return Path(pattern.format(run=run, name=run.name, prefix=run.name.rpartition("-")[0],
                                   seed=run.name.partition("-")[0]))
    def read(pattern: str | None, run: Path, missing_ok: bool = False) -> dict | None:
        found = pattern and path(pattern, run)
        return None if not found or missing_ok and not found.exists() else json.loads(found.read_text())
    def versus(run: Path) -> dict | None:                               # never a run against itself
        itself = args.versus and path(args.versus, run) == path(args.heldout, run)
        return None if itself else read(args.versus, run, missing_ok=True)
    table = [seed_row(run, read(args.start, run, missing_ok=True), read(args.heldout, run), versus(run),
                      read_metrics(path(args.metrics, run))) for run in args.runs]
    print(f"{'run':28} {'n':>4} {'sampled-none':>26} {'sampled-filler':>26} {'sampled-shuffled':>26} "
          f"{'oracle-none':>26} {'accuracy end-start':>26} wins")
    for r in table:
        d, change = r["diff"], r["thought_accuracy_end_minus_start"]
        change = interval(change) if change else "(no start measured)"
        print(f"{Path(r['run']).name:28} {r['answers']:>4} {interval(d['sampled-none']):>26} "
              f"{interval(d['sampled-filler']):>26} {interval(d['sampled-shuffled']):>26} "
              f"{interval(d['oracle-none']):>26} {change:>26} {r['wins']}")
    if args.svg:
        args.svg.write_text(accuracy_svg(table, "Thoughts before a bare answer that write it (train.py's evaluations)"))
    if args.markdown:
        args.markdown.write_text(markdown(table))
    if args.out:
        args.out.write_text(json.dumps({"command": "python -m machinery.content_table " + " ".join(sys.argv[1:]),
                                        "seeds": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
