"""Evaluate a checkpoint with and without thoughts, on the same questions or tokens, side by side.

    python eval.py --model out --task nll --data arithmetic                   # held-out problems, with controls
    python eval.py --model out --task nll --data ../shared/data/c4/c4_en_sample_900.jsonl --limit 50
    python eval.py --model out --task gsm8k --data ../shared/data/gsm8k/test.jsonl --limit 200 --out gsm8k.json
    python eval.py --model out --task csqa --data ../shared/data/commonsense_qa/validation.jsonl --limit 200
    python eval.py --model out --task gsm8k_gen --data ../shared/data/gsm8k/test.jsonl --limit 20 --votes 1
    python eval.py --model out --task thoughts --data arithmetic              # the thoughts page
    python -m research.content --model out                                    # bare answers: the oracle, accuracy

Tasks:
  nll          held-out text, each next token scored four ways: no thought, the sampled thought, a filler
               thought ("." repeated) and a thought sampled for another window; the paired differences with 95%
               bootstrap intervals over windows, on all tokens and on the hardest 10% (ranked by the mean NLL of
               the four, so that no side is flattered), mixed and from the post-thought prediction alone.
               --data arithmetic: built-in problems from a seed no training run uses, --bare_fraction of them
               answered bare, whose answer digits are shown as a subset ("focus"); research/content.py scores
               them with windows aligned on them, the oracle thought and how often the thought writes the answer.
  gsm8k, csqa  the official protocol (machinery/benchmarks.py): the teacher-forced probability of the gold answer,
               renormalised over the allowed tokens ("soft"), and exact match; with thoughts: one sampled thought
               before every token, mixed.
  gsm8k_gen    zero-shot "Let's think step by step", then "Therefore, the answer (arabic numerals) is", the
               first integer against the gold one; optional majority vote over --votes samples.
  thoughts     the thoughts page (machinery/thoughts_page.py) for the first --seq_len tokens of --data ("arithmetic"
               or a .txt/.jsonl file), with the training curves of <model>/metrics.jsonl if there is one.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import TokenWindows, arithmetic_texts, bare_answer_spans, document_text, filler_token_id, parse_kinds
from generate import token_scores
from machinery.benchmarks import answer_scores, gsm8k_generation, read_rows
from machinery.cli import Parser, UsageError, add_model_options, at_least, check_writable, fail
from machinery.hf_io import load_model
from qstar import QuietStar

TASKS = ("gsm8k", "csqa", "gsm8k_gen", "nll", "thoughts")
HELDOUT_SEED = 1_000_000   # held-out arithmetic problems come from seeds no training run uses (train.py: seed .. seed+2)


# ---- held-out NLL: the sampled thought against no thought and two controls -------------------------------
#
# A thought can lower the NLL in two ways: by what it says, or merely by being there (the mixing head and the
# extra passes add capacity whatever the thought holds: a "pause token" effect). To tell them apart, the same
# tokens of the same checkpoint are scored four ways, and the sampled thought is compared with each other one:
#   none      no thought (the base prediction)
#   sampled   the thought sampled at that position (what Quiet-STaR does)
#   filler    a thought of the same length with no content: "." repeated
#   shuffled  a real thought of the same model, sampled for another text: the one at the same position of the
#             next window (or, with a single window, half a window away)
#   oracle    on built-in arithmetic, before each bare answer's digits: the problem's own last worked step
#             ("78-22=56."), the thought a perfect policy could write. oracle - none is the headroom: how much a
#             right thought helps this checkpoint's mixing path (exactly 0 before training: the weight is 0)
# Differences are paired (same tokens), with 95% bootstrap intervals over windows (windows are the independent
# units; tokens of one window are not).

PREDICTORS = ("none", "sampled", "filler", "shuffled", "oracle")
CONTRASTS = (("sampled", "none"), ("sampled", "filler"), ("sampled", "shuffled"), ("oracle", "none"))


def donor_thoughts(thought_ids: torch.Tensor) -> torch.Tensor:
    """(W, T, L) thoughts of W windows -> other texts' thoughts, position by position: window w gets w+1's."""
    if len(thought_ids) > 1:
        return thought_ids.roll(-1, dims=0)
    return thought_ids.roll(thought_ids.shape[1] // 2, dims=1)


@torch.no_grad()
def score_thoughts(qs: QuietStar, windows: torch.Tensor, filler_id: int, batch_size: int = 4,
                   oracle: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """windows (W, T) -> per-token NLL of x_{i+1} (W, T-1) under each of PREDICTORS (oracle: if its thoughts
    (W, T, L) are given), mixed, and post_<predictor>: the same from the post-thought prediction alone; the
    mixing weight of the sampled thought (W, T-1). Uses the global torch RNG for the sampled thoughts."""
    L = qs.config.thought_len
    batches = range(0, len(windows), batch_size)
    nll, weight, sampled_ids = defaultdict(list), [], []
    for i in tqdm(batches, desc="held-out NLL: sampled thoughts", unit="batch", leave=False):
        scores = token_scores(qs, windows[i:i + batch_size])
        nll["none"].append(scores["nll_base"].float())
        nll["sampled"].append(scores["nll_mixed"].float())
        nll["post_sampled"].append(scores["nll_post"].float())
        weight.append(scores["mix_weight"].float())
        sampled_ids.append(scores["thought_ids"])
    donors = donor_thoughts(torch.cat(sampled_ids))
    for i in tqdm(batches, desc="held-out NLL: controls", unit="batch", leave=False):
        w = windows[i:i + batch_size]
        given = {"filler": torch.full((*w.shape, L), filler_id, dtype=torch.long, device=w.device),
                 "shuffled": donors[i:i + batch_size]} | ({} if oracle is None else {"oracle": oracle[i:i + batch_size]})
        for name, thoughts in given.items():
            scores = token_scores(qs, w, thoughts)
            nll[name].append(scores["nll_mixed"].float())
            nll[f"post_{name}"].append(scores["nll_post"].float())
    return {p: torch.cat(v).cpu() for p, v in nll.items()} | {"mix_weight": torch.cat(weight).cpu(),
                                                               "thought_ids": torch.cat(sampled_ids).cpu(),
                                                               "donor_ids": donors.cpu()}


def paired_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over the tokens in mask, (W, T) each, and its 95% bootstrap interval: windows (rows) are
    resampled with replacement and the token-weighted mean is recomputed. -> (mean, low, high)"""
    sums = ((a - b) * mask).sum(dim=1).double().numpy()
    counts = mask.sum(dim=1).double().numpy()
    sums, counts = sums[counts > 0], counts[counts > 0]                      # windows without such tokens
    if len(counts) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    boot = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return float(sums.sum() / counts.sum()), float(low), float(high)


def hard_tokens(nlls: list[torch.Tensor], mask: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """The hardest `fraction` of the tokens in mask, ranked by the mean NLL of all the predictors compared.
    Ranking by one predictor's NLL would favour every other one: a token picked because that predictor's NLL
    is high by chance will, on average, be lower under any other (regression to the mean)."""
    mean = torch.stack(nlls).mean(dim=0)
    if not mask.any():
        return mask
    return mask & (mean >= mean[mask].quantile(1 - fraction))


def compare_thoughts(nll: dict[str, torch.Tensor], focus: torch.Tensor | None = None, n_boot: int = 2000,
                     seed: int = 0, focus_only: bool = False) -> dict:
    """Per-token NLLs of PREDICTORS (W, T-1) -> mean NLL of each and the paired CONTRASTS with intervals, on
    all tokens, on the hardest 10% (chosen by the mean of the four), and on the focus tokens (W, T-1) if given;
    focus_only: on those alone (score_focus scored nothing else). The oracle thought exists only before focus
    tokens: it is compared there only."""
    everywhere = [p for p in PREDICTORS if p in nll and p != "oracle"]
    everything = torch.ones_like(nll["none"], dtype=torch.bool)
    subsets = {} if focus_only else {"all": everything, "hard": hard_tokens([nll[p] for p in everywhere], everything)}
    if focus is not None and focus.any():
        subsets["focus"] = focus
    out = {}
    for name, mask in subsets.items():
        shown = [p for p in PREDICTORS if p in nll and (p != "oracle" or name == "focus")]
        out[name] = {"n_tokens": int(mask.sum()), "n_windows": int(mask.any(dim=1).sum()),
                     "nll": {p: float(nll[p][mask].mean()) for p in shown},
                     "diff": {f"{a}-{b}": paired_difference(nll[a], nll[b], mask, n_boot, seed)
                              for a, b in CONTRASTS if a in shown and b in shown}}
    out["mix_weight"] = float(nll["mix_weight"].mean()) if "mix_weight" in nll else None
    return out






def thinking_wins(comparison: dict, subset: str) -> bool:
    """The sampled thought beats no thought and both controls, every 95% interval below zero."""
    return subset in comparison and all(high < 0 for _, _, high in comparison[subset]["diff"].values())


def format_comparison(comparison: dict) -> str:
    lines = [f"{'tokens':>16} {'n':>6} " + " ".join(f"{p:>9}" for p in PREDICTORS) + "   " +
             "   ".join(f"{a}-{b} [95% CI]" for a, b in CONTRASTS)]
    for name in ("all", "hard", "focus"):
        if name not in comparison:
            continue
        c = comparison[name]
        label = {"all": "all", "hard": "hardest 10%", "focus": "focus"}[name]
        lines.append(f"{label:>16} {c['n_tokens']:>6} " + " ".join(
            f"{c['nll'][p]:>9.4f}" if p in c["nll"] else f"{'-':>9}" for p in PREDICTORS) + "   " +
            "   ".join(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, lo, hi in c["diff"].values()))
    return "\n".join(lines)


def heldout_nll(qs: QuietStar, tokenizer, texts: list[str], seq_len: int, batch_size: int, focus=None,
                text_windows: int | None = None) -> dict:
    """Held-out text -> compare_thoughts on (the first text_windows) consecutive windows, mixed ("text") and from
    the post-thought prediction alone ("text_post"); `focus` (text -> character spans) adds a "focus" subset."""
    eos = (qs.model.config.eos_ids or [None])[0]
    device = qs.model.embed_tokens.weight.device
    stream = TokenWindows(texts, tokenizer, seq_len, eos, seed=0, focus=focus)
    filler = filler_token_id(tokenizer)
    windows, window_focus = stream.windows(text_windows or 10**9)
    windows = torch.from_numpy(windows).to(device)
    scores = score_thoughts(qs, windows, filler, batch_size)
    window_focus = torch.from_numpy(window_focus[:, 1:])
    return {"text": compare_thoughts(scores, window_focus),
            "text_post": compare_thoughts(post_scores(scores), window_focus)}


def post_scores(scores: dict) -> dict:
    """score_thoughts' post-thought NLLs under the predictors' own names (none has no thought: the same)."""
    return {"none": scores["none"]} | {k[5:]: v for k, v in scores.items() if k.startswith("post_")}


def evaluation_row(qs: QuietStar, windows: torch.Tensor, filler_id: int, batch_size: int = 4) -> dict:
    """train.py's evaluation of consecutive held-out windows, as a metrics row: the NLLs of the predictors on all
    tokens and the hardest 10%, mixed, and on all tokens from the post-thought prediction alone."""
    scores, row = score_thoughts(qs, windows, filler_id, batch_size), {}
    result, post = compare_thoughts(scores), compare_thoughts(post_scores(scores))
    for prefix, comparison, subset in (("eval_", result, "all"), ("eval_hard_", result, "hard"),
                                       ("eval_post_", post, "all")):
        row |= {f"{prefix}nll_{p}": round(v, 6) for p, v in comparison[subset]["nll"].items()}
        row[f"{prefix}diff"] = {k: [round(x, 6) for x in v] for k, v in comparison[subset]["diff"].items()}
    row["eval_mix_weight"] = round(result["mix_weight"], 6)
    return row


# ---- command line ---------------------------------------------------------------------------------------





def nll_texts(args) -> tuple[list[str], object]:
    """The documents of the nll task and the focus function: built-in arithmetic problems from a seed no
    training run uses (--bare_fraction of them bare, whose answer digits are the focus), or a data file."""
    if args.data == "arithmetic":
        texts = arithmetic_texts(args.limit or 400, seed=HELDOUT_SEED + args.seed, bare_fraction=args.bare_fraction,
                                 kinds=args.problems)
        return texts, bare_answer_spans if args.bare_fraction > 0 else None
    rows = read_rows("nll", args.data, args.limit)
    return [document_text(row, f"--data {args.data}: row {n}") for n, row in enumerate(rows, 1)], None


def run(args) -> dict:
    started = time.time()
    if args.task == "nll":
        texts, focus = nll_texts(args)
        qs, tokenizer = load_model(args)
        torch.manual_seed(args.seed)
        n, result = len(texts), heldout_nll(qs.eval(), tokenizer, texts, args.seq_len, args.batch_size, focus,
                                            args.text_windows)
    else:
        rows = read_rows(args.task, args.data, args.limit)
        qs, tokenizer = load_model(args)
        qs.eval()
        torch.manual_seed(args.seed)
        n = len(rows)
        if args.task in ("gsm8k", "csqa"):
            result = answer_scores(qs, tokenizer, args.task, rows, args.batch_size)
        else:
            result = gsm8k_generation(qs, tokenizer, rows, args.votes, args.max_new_tokens, args.seed)
    return {"task": args.task, "model": str(args.model), "data": args.data, "limit": args.limit, "n": n,
            "thought_len": qs.config.thought_len, "seed": args.seed, "seconds": round(time.time() - started, 1),
            "command": "python eval.py " + " ".join(args.argv), **result}


def print_table(result: dict):
    print(f"\n{result['task']} on {result['n']} items, {result['model']} (thought length {result['thought_len']}, "
          f"{result['seconds']} s)")
    if result["task"] == "nll":
        for name, title in (("text", "mixed"), ("text_post", "post-thought prediction alone")):
            print(f"consecutive windows, {title}:\n" + format_comparison(result[name]))
        return
    metrics = [k for k in result["no_thoughts"] if k not in ("n", "examples", "tokens_per_s")]
    print(f"{'':14}" + "".join(f"{m:>12}" for m in metrics))
    for key in ("no_thoughts", "thoughts"):
        print(f"{key:14}" + "".join(f"{result[key][m]:>12.4f}" for m in metrics))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--task", required=True, choices=TASKS, help="what to measure (see above)")
    parser.add_argument("--data", required=True, help="a local .jsonl file, or 'hub' for the task's Hub dataset "
                        "(nll and thoughts: also 'arithmetic' or a .txt file)")
    parser.add_argument("--limit", type=at_least(1), default=None, help="first N questions / documents (default: all)")
    parser.add_argument("--out", default=None, help="write the result (JSON; thoughts: the HTML page) here")
    parser.add_argument("--batch_size", type=at_least(1), default=4, help="texts per forward (default: %(default)s)")
    parser.add_argument("--votes", type=at_least(1), default=1, help="gsm8k_gen: samples per question, majority vote "
                        "(default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=at_least(1), default=128, help="gsm8k_gen: reasoning length "
                        "(default: %(default)s)")
    parser.add_argument("--seq_len", type=at_least(2), default=128, help="nll and thoughts: window length "
                        "(default: %(default)s)")
    parser.add_argument("--text_windows", type=at_least(1), default=None, help="nll: score only the first N "
                        "consecutive windows (the focus windows are always all scored) (default: all)")
    parser.add_argument("--bare_fraction", type=float, default=0.5, help="nll and thoughts on --data arithmetic: "
                        "fraction of problems answered bare; their digits are the focus tokens (default: %(default)s)")
    parser.add_argument("--problems", default="all", help="--data arithmetic: all, or a comma list of add, sub, mul, "
                        "multi (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="thought samples and held-out problems (default: 0)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if not 0 <= args.bare_fraction <= 1:
            raise UsageError(f"--bare_fraction must be between 0 and 1, got {args.bare_fraction}")
        parse_kinds(args.problems)
        if args.task == "thoughts":
            from machinery.thoughts_page import write_page
            print(f"wrote {write_page(args, HELDOUT_SEED)}")
            return 0
        if args.out:
            check_writable(args.out, "--out")
        result = run(args)
    except (UsageError, ValueError, OSError) as e:
        return fail(e)
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
