"""Does a thought help by what it says? The instruments for bare arithmetic answers, beside eval.py's controls.

    python -m research.content --model out                       # 400 held-out problems, half of them bare
    python -m research.content --model out --headroom 50         # per problem kind: bare vs worked, greedy, 50 each

At each bare answer ("A: 47.", built-in arithmetic), the answer digits are scored with five thoughts before them:
none, the sampled thought, a filler thought, another problem's thought (shuffled) and the oracle, the problem's own
last worked step ("78-22=56."): what a perfect policy could write. oracle - none is the headroom through the model's
mixing path. Each is scored twice: mixed (what the model predicts) and by the post-thought prediction alone (post:
does the reader use a right thought, whatever the mixing weight). Also: how often the sampled thought writes the
answer (thought accuracy) against another problem's thought, and the content reward (the sampled thought's reward
minus a shuffled and a filler thought's) where training thinks. Differences are paired, with 95% bootstrap
intervals over windows.
"""

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import KINDS, TokenWindows, arithmetic_problem, arithmetic_texts, bare_answer_spans, filler_token_id, \
    worked_steps
from eval import HELDOUT_SEED, compare_thoughts, donor_thoughts, format_comparison, paired_difference
from generate import decode, scores_at
from qstar import QuietStar
from research.levers import select_positions

def oracle_thoughts(tokenizer, windows: torch.Tensor, focus: torch.Tensor, length: int, filler_id: int,
                    padding: str = "front"):
    """The oracle thought before each bare answer: at every position whose next token is an answer digit (focus
    (W, T-1)), the last worked step of that answer's question (data.worked_steps), its last `length` tokens,
    filler-padded in front ("...23+19=42.") or at the end ("23+19=42...."); filler elsewhere. -> ids (W, T, length),
    found (W,) bool: the window has an answer and each of its answers has its question whole in the window."""
    ids = torch.full((*windows.shape, length), filler_id, dtype=torch.long)
    found = torch.zeros(len(windows), dtype=torch.bool)
    for w in range(len(windows)):
        answers = []                                              # runs of consecutive positions: one per answer
        for i in focus[w].nonzero()[:, 0].tolist():
            if answers and i == answers[-1][-1] + 1:
                answers[-1].append(i)
            else:
                answers.append([i])
        found[w] = bool(answers)
        for positions in answers:
            question = tokenizer.decode(windows[w, :positions[0] + 1].tolist()).rpartition("Q:")[2]
            steps = worked_steps(question)
            if steps is None:                                     # the question is cut off by the window
                found[w] = False
                continue
            step = tokenizer.encode(steps.split(" ")[-1], add_special_tokens=False).ids[-length:]
            pad = [filler_id] * (length - len(step))
            ids[w, positions] = torch.tensor(pad + step if padding == "front" else step + pad)
    return ids.to(windows.device), found


def focus_positions(focus: torch.Tensor) -> torch.Tensor:
    """focus (W, T-1) -> the positions i whose next token is a focus token, (W, K), each row padded by repeating
    its first one (a window without any: position 0)."""
    rows = [row.nonzero()[:, 0].tolist() or [0] for row in focus]
    width = max(len(r) for r in rows)
    return torch.tensor([r + r[:1] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def score_focus(qs: QuietStar, windows: torch.Tensor, focus: torch.Tensor, filler_id: int, batch_size: int = 4,
                oracle: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """eval.score_thoughts for the focus tokens (W, T-1) only, each window thinking at its focus positions alone
    (generate.scores_at): the same keys and shapes (post_<predictor>: the post-thought prediction alone), 0 (and
    filler thoughts) wherever focus is False."""
    at = focus_positions(focus).to(windows.device)                              # (W, K)
    L, W, T = qs.config.thought_len, *windows.shape
    batches = range(0, W, batch_size)
    sampled = [scores_at(qs, windows[i:i + batch_size], at[i:i + batch_size]) for i in batches]
    ids = torch.cat([s["thought_ids"] for s in sampled])                        # (W, K, L)
    given = {"filler": torch.full_like(ids, filler_id), "shuffled": donor_thoughts(ids)}
    if oracle is not None:
        given["oracle"] = oracle.to(windows.device).gather(1, at[..., None].expand(-1, -1, L))
    nll = {"none": torch.cat([s["nll_base"] for s in sampled]), "sampled": torch.cat([s["nll_mixed"] for s in sampled]),
           "post_sampled": torch.cat([s["nll_post"] for s in sampled])}
    stacked = torch.stack(list(given.values()), dim=1)                         # (W, P, K, L): one base pass
    scored = [scores_at(qs, windows[i:i + batch_size], at[i:i + batch_size], stacked[i:i + batch_size])
              for i in batches]
    for p, name in enumerate(given):
        nll[name], nll[f"post_{name}"] = (torch.cat([s[key][:, p] for s in scored]) for key in ("nll_mixed", "nll_post"))

    def spread(values: torch.Tensor, fill=0.0) -> torch.Tensor:                # (W, K, ..) -> (W, T-1 or T, ..)
        width = T if values.dim() == 3 else T - 1
        out = values.new_full((W, width, *values.shape[2:]), fill)
        out[torch.arange(W, device=values.device)[:, None], at] = values
        return out.cpu()
    outside = ~focus.cpu()                                                      # padding rows of `at` included
    return {p: spread(v.float()).masked_fill(outside, 0) for p, v in nll.items()} | {
        "mix_weight": spread(torch.cat([s["mix_weight"] for s in sampled]).float()).masked_fill(outside, 0),
        "thought_ids": spread(ids, filler_id), "donor_ids": spread(given["shuffled"], filler_id)}


def thinks_at_chosen_positions(qs: QuietStar) -> bool:
    """think_at entropy:Q or random:Q: positions chosen per window from the model or at random."""
    return getattr(qs.config, "think_rule", "all") in ("entropy", "random")


def chosen_positions(qs: QuietStar, h_base: torch.Tensor) -> torch.Tensor | None:
    """Where training would think in these windows (think_at entropy:Q or random:Q): h_base (B, T, D) -> positions
    (B, K); None for the other rules (all, and answers or answers+random:Q, whose answers are not known here)."""
    if not thinks_at_chosen_positions(qs):
        return None
    ok = torch.ones(h_base.shape[0], h_base.shape[1] - 1, dtype=torch.bool, device=h_base.device)
    logits = qs.model.lm_head(h_base[:, :-1]) if qs.config.think_rule == "entropy" else None
    return select_positions(logits, ok, qs.config.think_fraction, qs.config.think_rule)


@torch.no_grad()
def thought_rewards_at(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor | None = None):
    """Steps 1-4 with one thought per position: -> rewards {"mixed", "post"} (B, T) (training's reward from
    each source), the thought ids (B, T, L), and where the model thinks and a next token exists (B, T). Given
    thoughts (B, P, T, L): P sets after one shared base pass, rewards (B, P, T)."""
    (B, T), sets = tokens.shape, 1 if thought_ids is None or thought_ids.dim() == 3 else thought_ids.shape[1]
    ok = torch.ones(B, T - 1, dtype=torch.bool, device=tokens.device)
    h_base, cache = qs.base_pass(tokens)
    logp_base = qs._token_logp(h_base[:, :-1], tokens[:, 1:])
    ids, _ = qs.think(tokens, cache, sets, None if thought_ids is None else thought_ids.reshape(-1, T, thought_ids.shape[-1]))
    talk = qs.talk(tokens, h_base, cache, sets)
    rewards, _ = qs.rewards(tokens, ok, logp_base, talk, torch.arange(T, device=tokens.device).expand(B, T), sets)
    if thought_ids is not None and thought_ids.dim() == 4:
        rewards = {k: v.view(B, sets, T) for k, v in rewards.items()}
    where = F.pad(ok, (0, 1))
    chosen = chosen_positions(qs, h_base)                                      # None: every position
    if chosen is not None:
        where &= torch.zeros_like(where).scatter(1, chosen, True)
    return rewards, ids, where


def content_reward(qs: QuietStar, windows: torch.Tensor, filler_id: int, batch_size: int = 4, seed: int = 0) -> dict:
    """The reward of the sampled thought minus that of a thought sampled for another window at the same position
    (donor_thoughts, "shuffled") and minus that of a filler thought, where the model thinks: what the thought says,
    in training's own currency. {"<source>" (the shuffled control), "<source>_filler"}: (mean, 95% low, 95% high)
    per reward source (mixed, post), bootstrap over windows."""
    batches = range(0, len(windows), batch_size)
    sampled = [thought_rewards_at(qs, windows[i:i + batch_size]) for i in batches]
    ids = torch.cat([ids for _, ids, _ in sampled])
    where = torch.cat([w for _, _, w in sampled]).cpu()
    controls = torch.stack([donor_thoughts(ids), torch.full_like(ids, filler_id)], dim=1)   # (W, 2, T, L)
    other = [thought_rewards_at(qs, windows[i:i + batch_size], controls[i:i + batch_size])[0] for i in batches]
    out = {}
    for p, control in enumerate(("", "_filler")):                               # shuffled, filler
        out |= {source + control: paired_difference(torch.cat([r[source] for r, _, _ in sampled]).float().cpu(),
                                                    torch.cat([r[source][:, p] for r in other]).float().cpu(), where,
                                                    seed=seed)
                for source in ("mixed", "post")}
    return out


@torch.no_grad()
def answers_selected(qs: QuietStar, windows: torch.Tensor, focus: torch.Tensor, batch_size: int = 16) -> float | None:
    """The fraction of bare answers whose first digit training would think before (think_at entropy:Q or random:Q): if it is
    low, the policy never practises where the oracle says a thought could help. None for the other rules."""
    if not thinks_at_chosen_positions(qs):
        return None
    first = focus.int().argmax(dim=1)                                            # (W,)
    chosen = []
    for i in range(0, len(windows), batch_size):
        h_base, _ = qs.base_pass(windows[i:i + batch_size])
        chosen.append((chosen_positions(qs, h_base) == first[i:i + batch_size, None]).any(dim=1))
    return torch.cat(chosen).float().mean().item()


def answer_thoughts(tokenizer, windows: torch.Tensor, focus: torch.Tensor, scores: dict, shown: int = 12) -> dict:
    """Read the thoughts sampled just before each answer's first digit (windows aligned on the answers): how often
    the thought writes the answer itself (the whole number), against the thought of another problem at the same
    place (the shuffled control), and a few examples; every sampled thought too, in order, to read their form.
    focus (W, T-1) marks target positions."""
    first = focus.int().argmax(dim=1)                                      # the position predicting digit 1
    hits, examples, per_answer, thoughts = {"sampled": 0, "shuffled": 0}, [], [], []
    for n, i in enumerate(first.tolist()):
        answer = tokenizer.decode(windows[n, i + 1:i + 1 + int(focus[n].sum())].tolist())
        sampled = tokenizer.decode(scores["thought_ids"][n, i].tolist())
        donor = tokenizer.decode(scores["donor_ids"][n, i].tolist())
        whole = re.compile(rf"(?<!\d){re.escape(answer.strip())}(?!\d)")      # the number, not a digit of one
        per_answer.append(int(bool(whole.search(sampled))))
        thoughts.append(sampled)
        hits["sampled"] += per_answer[-1]
        hits["shuffled"] += bool(whole.search(donor))
        if len(examples) < shown:
            examples.append({"before": tokenizer.decode(windows[n, max(0, i - 24):i + 1].tolist()),
                             "thought": sampled, "answer": answer})
    count = max(1, len(first))
    return {"n": len(first), "answer_in_sampled_thought": hits["sampled"] / count,
            "answer_in_shuffled_thought": hits["shuffled"] / count, "examples": examples,
            "sampled_hits": per_answer, "thoughts": thoughts}


def answer_comparison(qs: QuietStar, tokenizer, windows: torch.Tensor, focus: torch.Tensor, filler_id: int,
                      batch_size: int = 16) -> dict:
    """Windows (W, T) aligned on bare answers, focus (W, T) their digits -> {"mixed", "post"}: eval.compare_thoughts
    of the five predictors on the answer digits, mixed and post-thought alone; "answer_thoughts": how often the
    thought writes the answer; "answers_selected": where training thinks at chosen positions, how often those
    include the answer's first digit."""
    targets = focus[:, 1:].cpu()
    oracle, found = oracle_thoughts(tokenizer, windows.cpu(), targets, qs.config.thought_len, filler_id,
                                    getattr(qs.config, "oracle_padding", "front"))      # as the warm start forced it
    scores = score_focus(qs, windows, targets.to(windows.device), filler_id, batch_size, oracle)   # a few streams each
    post = {p: scores[f"post_{p}"] for p in ("sampled", "filler", "shuffled", "oracle")} | {"none": scores["none"]}
    counted = targets & found[:, None]
    first = counted & ~F.pad(targets[:, :-1], (1, 0))                         # each answer's first digit only
    result = {"mixed": compare_thoughts(scores, counted, focus_only=True),
              "post": compare_thoughts(post, counted, focus_only=True),
              "mixed_first_digit": compare_thoughts(scores, first, focus_only=True),
              "post_first_digit": compare_thoughts(post, first, focus_only=True),
              "answer_thoughts": answer_thoughts(tokenizer, windows.cpu(), targets, scores)}
    selected = answers_selected(qs, windows, targets.to(windows.device))
    return result if selected is None else result | {"answers_selected": selected}


def answer_row(qs: QuietStar, tokenizer, windows: torch.Tensor, focus: torch.Tensor, filler_id: int) -> dict:
    """train.py's evaluation of the answer-aligned held-out windows, as a metrics row."""
    result, row = answer_comparison(qs, tokenizer, windows, focus, filler_id), {}
    for name, prefix in (("mixed", "eval_answer_"), ("post", "eval_answer_post_")):
        if "focus" in result[name]:
            row |= {f"{prefix}nll_{p}": round(v, 6) for p, v in result[name]["focus"]["nll"].items()}
            row[f"{prefix}diff"] = {k: [round(x, 6) for x in v] for k, v in result[name]["focus"]["diff"].items()}
    hits = result["answer_thoughts"]
    row["eval_thought_accuracy"] = [round(hits["answer_in_sampled_thought"], 6),
                                    round(hits["answer_in_shuffled_thought"], 6), hits["n"]]
    if "answers_selected" in result:
        row["eval_answer_selected"] = round(result["answers_selected"], 6)
    return row


def heldout_answers(qs: QuietStar, tokenizer, texts: list[str], seq_len: int, batch_size: int = 16,
                    reward_windows: int = 8) -> dict:
    """answer_comparison on windows aligned on every bare answer of texts, the content reward on the first
    reward_windows of their consecutive windows."""
    eos = (qs.model.config.eos_ids or [None])[0]
    device = qs.model.embed_tokens.weight.device
    stream = TokenWindows(texts, tokenizer, seq_len, eos, seed=0, focus=bare_answer_spans)
    windows, focus = (torch.from_numpy(x) for x in stream.focus_windows(10**9))
    filler = filler_token_id(tokenizer)
    result = answer_comparison(qs, tokenizer, windows.to(device), focus.to(device), filler, batch_size)
    text_windows = torch.from_numpy(stream.windows(reward_windows)[0]).to(device)
    return result | {"content_reward": content_reward(qs, text_windows, filler)}


def wilson(hits: int, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p, z = hits / n, 1.96
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return centre - half, centre + half


BARE_OUTPUT = re.compile(r"^ ?(\d+)\.\n")                    # " 47.\n": a bare answer
WORKED_OUTPUT = re.compile(r"=.*The answer is (\d+)\.", re.S)  # "4*6=24. ... The answer is 47."


def read_answer(text: str) -> tuple[str, int | None]:
    """A greedy continuation of "Q: ...\nA:" -> (its format: bare | worked | other, the answer it gives)."""
    for form, pattern in (("bare", BARE_OUTPUT), ("worked", WORKED_OUTPUT)):
        match = pattern.search(text)
        if match:
            return form, int(match.group(1))
    return "other", None


FORMAT_CHARS = {"bare": "0123456789.", "worked": "0123456789+-*="}     # allowed while the format is being held


@torch.no_grad()
def greedy_in_format(model, tokenizer, prompt: str, form: str, max_new_tokens: int = 48) -> str:
    """The greedy continuation of `prompt` ("Q: ...\nA: "), held to a format by allowing only FORMAT_CHARS[form]:
    bare: digits, then the "." that ends the answer ("47."); worked: digits and + - * = until the first "=" (the
    first worked step, "4*6="), then free until "\nQ:" or EOS ("4*6=24. 23+24=47. The answer is 47.")."""
    allowed = [tokenizer.token_to_id(c) for c in FORMAT_CHARS[form]]
    if None in allowed:
        raise ValueError(f"the tokenizer has no single token for each of {FORMAT_CHARS[form]!r}")
    allowed = torch.tensor(allowed)
    cache, ids = model.new_cache(), []
    h = model.hidden(model.embed(torch.tensor([tokenizer.encode(prompt).ids])), cache=cache)[:, -1:]
    for _ in range(max_new_tokens):
        logits = model.lm_head(h)[0, -1]                                                   # (V,)
        held = form == "bare" or "=" not in tokenizer.decode(ids)
        token = int(allowed[logits[allowed].argmax()]) if held else int(logits.argmax())
        if token in model.config.eos_ids:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if (form == "bare" and text.endswith(".")) or "\nQ:" in text:
            break
        h = model.hidden(model.embed(torch.tensor([[token]])), cache=cache)
    return tokenizer.decode(ids).split("\nQ:")[0]


@torch.no_grad()
def headroom(model, tokenizer, n_per_kind: int = 50, seed: int = HELDOUT_SEED, max_new_tokens: int = 48) -> dict:
    """Per problem kind, greedy continuations of "Q: <question>\nA:" (no thought), checked against the answer:
    chosen: the format the model picks, read as bare ("A: 47."), worked ("A: 4*6=24. ... The answer is 47.") or
    other; forced: the same problems held to each format (greedy_in_format), and worked - bare paired over them,
    the accuracy a thought that writes the worked step could buy.
    -> {kind: {n, chosen: {bare, worked, other}, forced: {bare, worked, worked_minus_bare}}}, each format
    {n, correct, accuracy, interval}, the difference (mean, low, high)."""
    import random
    out = {}
    for kind in KINDS:
        rng = random.Random(f"{seed}-{kind}")
        chosen = {"bare": [0, 0], "worked": [0, 0], "other": [0, 0]}
        right = {"bare": [], "worked": []}
        for _ in range(n_per_kind):
            text = arithmetic_problem(rng, bare=True, kinds=(kind,))
            question, _, answer = text.partition("\nA: ")
            answer = int(answer.rstrip(".\n"))
            generated = decode(model, tokenizer, question + "\nA:", max_new_tokens, stop=["\nQ:"]).text
            form, given = read_answer(generated + "\n")
            chosen[form][0] += 1
            chosen[form][1] += given == answer
            for held in right:
                given = read_answer(" " + greedy_in_format(model, tokenizer, question + "\nA: ", held,
                                                           max_new_tokens) + "\n")
                right[held].append(given == (held, answer))
        forced = {form: [len(hits), sum(hits)] for form, hits in right.items()}
        a, b = (torch.tensor(right[f], dtype=torch.float64)[:, None] for f in ("worked", "bare"))
        out[kind] = {"n": n_per_kind, "chosen": proportions(chosen), "forced": proportions(forced) | {
            "worked_minus_bare": paired_difference(a, b, torch.ones_like(a, dtype=torch.bool))}}
    return out


def proportions(counts: dict) -> dict:
    return {form: {"n": n, "correct": c, "accuracy": c / n if n else float("nan"), "interval": wilson(c, n)}
            for form, (n, c) in counts.items()}


def format_headroom(table: dict) -> str:
    lines = [f"{'kind':>6} {'n':>4}  {'chosen bare: n, acc [95%]':>27}  {'chosen worked: n, acc [95%]':>27}  "
             f"other  {'forced bare':>17}  {'forced worked':>17}  worked - bare [95%]"]
    for kind, r in table.items():
        c, f = r["chosen"], r["forced"]
        cells = [f"{c[x]['n']:>4}, {c[x]['accuracy']:.2f} [{c[x]['interval'][0]:.2f}, {c[x]['interval'][1]:.2f}]"
                 for x in ("bare", "worked")]
        cells += [f"{f[x]['accuracy']:.2f} [{f[x]['interval'][0]:.2f}, {f[x]['interval'][1]:.2f}]"
                  for x in ("bare", "worked")]
        d = f["worked_minus_bare"]
        lines.append(f"{kind:>6} {r['n']:>4}  {cells[0]:>27}  {cells[1]:>27}  {c['other']['n']:>5}  {cells[2]:>17}  "
                     f"{cells[3]:>17}  {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    from machinery.cli import Parser, add_model_options, fail
    from machinery.hf_io import load_model
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--limit", type=int, default=400, help="held-out problems (default: %(default)s)")
    parser.add_argument("--bare_fraction", type=float, default=0.5, help="of them bare (default: %(default)s)")
    parser.add_argument("--problems", default="all", help="all, or a comma list of add, sub, mul, multi")
    parser.add_argument("--seq_len", type=int, default=64, help="window length (default: %(default)s)")
    parser.add_argument("--headroom", type=int, default=0, metavar="N",
                        help="instead: N problems per kind, greedy bare against worked (no thought)")
    parser.add_argument("--reward_windows", type=int, default=8, help="consecutive windows for the content reward "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="thought samples and held-out problems (default: 0)")
    parser.add_argument("--thought_temperature", type=float, default=None, help="sample the thoughts at this "
                        "temperature instead of the checkpoint's (the official code meant 0.001 at evaluation)")
    parser.add_argument("--out", type=Path, default=None, help="write the result here (JSON)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    started = time.time()
    try:
        qs, tokenizer = load_model(args)
        if args.thought_temperature is not None:                      # the config's own check refuses <= 0
            qs.config = dataclasses.replace(qs.config, thought_temperature=args.thought_temperature)
        torch.manual_seed(args.seed)
        if args.headroom:
            result = {"headroom": headroom(qs.model, tokenizer, args.headroom, HELDOUT_SEED + args.seed)}
            print(format_headroom(result["headroom"]))
        else:
            texts = arithmetic_texts(args.limit, seed=HELDOUT_SEED + args.seed, bare_fraction=args.bare_fraction,
                                     kinds=args.problems)
            result = heldout_answers(qs.eval(), tokenizer, texts, args.seq_len, reward_windows=args.reward_windows)
            for name in ("mixed", "post", "mixed_first_digit", "post_first_digit"):
                print(f"answer digits, {name.replace('_', ' ')}:\n" + format_comparison(result[name]))
            a = result["answer_thoughts"]
            print(f"thoughts that write the answer: {a['answer_in_sampled_thought']:.3f} (another problem's: "
                  f"{a['answer_in_shuffled_thought']:.3f}; n = {a['n']})")
    except (ValueError, OSError) as e:
        return fail(e)
    result |= {"model": str(args.model), "thought_temperature": qs.config.thought_temperature,
               "seconds": round(time.time() - started, 1), "command": "python -m research.content " + " ".join(argv)}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
