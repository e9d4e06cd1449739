"""Evaluate a checkpoint with and without thoughts, on the same questions or tokens, side by side.

    python eval.py --model out --task nll --data arithmetic                   # held-out problems, with controls
    python eval.py --model out --task nll --data ../shared/data/c4/c4_en_sample_900.jsonl --limit 50
    python eval.py --model out --task gsm8k --data ../shared/data/gsm8k/test.jsonl --limit 200 --out gsm8k.json
    python eval.py --model out --task csqa --data ../shared/data/commonsense_qa/validation.jsonl --limit 200
    python eval.py --model out --task gsm8k_gen --data ../shared/data/gsm8k/test.jsonl --limit 20 --votes 1
    python eval.py --model out --task thoughts --data arithmetic              # the thoughts page

Tasks:
  nll          held-out text, each next token scored four ways: no thought, the sampled thought, a filler
               thought ("." repeated) and a thought sampled for another window; the paired differences with 95%
               bootstrap intervals over windows, on all tokens and on the hardest 10% (ranked by the mean NLL of
               the four, so that no side is flattered); the content reward (sampled minus shuffled thought's
               reward). --data arithmetic: built-in problems from a seed no training run uses, --bare_fraction
               of them answered bare; their answer digits are scored again on windows aligned on them ("focus"),
               thinking there only, with a fifth predictor, the oracle thought (the problem's last worked step),
               and how often the sampled thought writes the answer.
  gsm8k, csqa  the official protocol (docs/official_code.md): "Q: ...\nA: <answer>\n", the teacher-forced
               probability of the gold answer tokens, each renormalised over the allowed tokens (the digits' or
               letters' own tokens and the newline), multiplied over the answer ("soft"); "exact" counts answers
               whose every token is the most likely allowed one. With thoughts: one sampled thought before every
               token, mixed.
  gsm8k_gen    zero-shot "Let's think step by step", then "Therefore, the answer (arabic numerals) is", the
               first integer against the gold one; optional majority vote over --votes samples.
  thoughts     the thoughts page (machinery/thoughts_page.py) for the first --seq_len tokens of --data ("arithmetic" or a
               .txt/.jsonl file), with the training curves of <model>/metrics.jsonl if there is one.
"""

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import (
    TokenWindows,
    arithmetic_texts,
    bare_answer_spans,
    document_text,
    parse_kinds,
    read_jsonl,
    read_texts,
    worked_steps,
)
from machinery.cli import Parser, UsageError, add_model_options, at_least, check_writable, fail
from machinery.hf_io import load_model
from qstar import QuietStar, at_streams, mix, select_positions

TASKS = ("gsm8k", "csqa", "gsm8k_gen", "nll", "thoughts")
HELDOUT_SEED = 1_000_000   # held-out arithmetic problems come from seeds no training run uses (train.py: seed, seed+1)
HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main", "test"), "csqa": ("tau/commonsense_qa", None, "validation")}


# ---- data ---------------------------------------------------------------------------------------------

def read_rows(task: str, data: str, limit: int | None) -> list[dict]:
    """Rows of a local .jsonl file, or of the task's Hub dataset when `data` names it (needs `datasets`)."""
    path = Path(data).expanduser()
    if path.is_file():
        rows = [row for _, row in read_jsonl(path)]
    elif data in ("hub", *(spec[0] for spec in HUB_DATASETS.values())) and task in HUB_DATASETS:
        import datasets
        name, config, split = HUB_DATASETS[task]
        rows = list(datasets.load_dataset(name, config, split=split))
    else:
        raise FileNotFoundError(f"--data {data!r} is not a file. Here the data is in ../shared/data "
                                f"(gsm8k/test.jsonl, commonsense_qa/validation.jsonl, c4/c4_en_sample_900.jsonl)")
    if not rows:
        raise ValueError(f"--data {data}: the file holds no rows")
    needed = {"gsm8k": {"question", "answer"}, "gsm8k_gen": {"question", "answer"},
              "csqa": {"question", "choices", "answerKey"}}.get(task, set())
    for number, row in enumerate(rows, 1):
        if not needed <= row.keys():
            raise ValueError(f"--data {data} does not look like {task} data: row {number} needs {sorted(needed)}, "
                             f"has {sorted(row)}")
    return rows[:limit] if limit else rows


def gold_number(row: dict) -> str:
    return row["answer"].split("####")[-1].strip().replace(",", "")


def qa_prompt(task: str, row: dict) -> tuple[str, str]:
    """(prompt, answer) in the official evaluation format."""
    if task == "gsm8k":
        return f"Q: {row['question']}\nA:", f" {gold_number(row)}\n"
    choices = "\n".join(f"({label}) {text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"]))
    return f"Q: {row['question']}\n{choices}\nA:", f" {row['answerKey']}\n"


ANSWER_SYMBOLS = {"gsm8k": "0123456789", "csqa": "ABCDE"}


def allowed_token_ids(tokenizer, symbols: str) -> torch.Tensor:
    """The official score's allowed set: the tokens the answer symbols are written as, after "A: " and inside a
    number, plus the newline that ends the answer; nothing else (the official compute_metrics: Mistral's ten digit
    tokens + newline, or its five letter tokens + newline). Errors if a symbol is not a token of its own."""
    allowed = set()
    numbers = [f"A: {symbols}\n"] if symbols.isdigit() else []             # digits also inside a longer number
    for text in [f"A: {s}\n" for s in symbols] + numbers:
        encoding = tokenizer.encode(text, add_special_tokens=False)
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            piece = text[start:end]
            if end > 3 and piece.strip():                                      # the answer's own tokens
                if piece.strip() not in symbols or len(piece.strip()) != 1:
                    raise ValueError(f"the tokenizer writes {text!r} with the token {piece!r}: the official score "
                                     "needs one token per answer symbol")
                allowed.add(token)
            elif piece == "\n":
                allowed.add(token)
    return torch.tensor(sorted(allowed))


def soft_score(logits: torch.Tensor, ids: list[int], positions: list[int], allowed: torch.Tensor) -> tuple[float, bool]:
    """The official score of one answer: logits (T, V) of a text whose tokens are ids; positions: the answer
    tokens to score. Each one's probability from the logits one position earlier, renormalised over the allowed
    tokens, multiplied together ("soft"); "exact": every scored token is the most likely allowed one.
    Nothing to score counts as wrong (the official product would stay 1: "correct")."""
    if not positions:
        return 0.0, False
    index = {token: k for k, token in enumerate(allowed.tolist())}
    probs = logits[[j - 1 for j in positions]].float()[:, allowed.to(logits.device)].softmax(dim=-1)
    gold = torch.tensor([index[ids[j]] for j in positions], device=logits.device)
    rows = torch.arange(len(positions), device=logits.device)
    return probs[rows, gold].prod().item(), bool((probs.argmax(-1) == gold).all())


# ---- per-token predictions with one thought per position -----------------------------------------------

def end_hidden(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor | None = None,
               at: torch.Tensor | None = None):
    """One thought per position (or per position in at (B, K)), up to <end>: -> h_base (B, T, D), h_end (B, T or K,
    D) and the thought ids (B, T or K, L)."""
    h_base, cache = qs.base_pass(tokens)
    ids, _ = qs.think(tokens, cache, 1, thought_ids, at)
    _, end = qs.marker_embeddings()
    return h_base, qs._pass(end.expand(*ids.shape[:2], -1), qs.end_offset, cache), ids


def chosen_positions(qs: QuietStar, h_base: torch.Tensor) -> torch.Tensor:
    """Where training would think in these windows (think_at entropy:Q or random:Q): h_base (B, T, D) -> positions
    (B, K)."""
    ok = torch.ones(h_base.shape[0], h_base.shape[1] - 1, dtype=torch.bool, device=h_base.device)
    return select_positions(qs.model.lm_head(h_base[:, :-1]), ok, qs.config.think_fraction,
                            qs.config.think_rule)


@torch.no_grad()
def sample_thoughts(qs: QuietStar, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) -> one sampled thought per position, ids (B, T, L)."""
    _, cache = qs.base_pass(tokens)
    return qs.think(tokens, cache, 1)[0]


def thought_logits(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, T), thought_ids (B, T, L) -> LM-head logits (B, T, V) of the hidden state at <end>
    (before mixing): what each position predicts for x_{i+1} right after its own thought."""
    if thought_ids.shape != (*tokens.shape, qs.config.thought_len):
        raise ValueError(f"thought_ids must be (B, T, thought_len) = {(*tokens.shape, qs.config.thought_len)}, "
                         f"got {tuple(thought_ids.shape)}")
    return qs.model.lm_head(end_hidden(qs, tokens, thought_ids)[1])


@torch.no_grad()
def predict(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What every position i predicts for x_{i+1}, without and with a thought (one sampled per position). Every
    position thinks, also with think_at entropy:Q (which saves training compute): the controls are then measured
    wherever they might matter, and the mixing head decides how much each thought is used.

    -> h_base, h_mixed (B, T, D): LM-head inputs (apply qs.model.lm_head for logits);
       mix_weight (B, T); thought_ids (B, T, L)."""
    h_base, h_end, ids = end_hidden(qs, tokens, thought_ids)
    mix_weight = qs.mixing_head(h_base, h_end)
    return {"h_base": h_base, "h_mixed": mix(h_base, h_end, mix_weight), "mix_weight": mix_weight[..., 0],
            "thought_ids": ids}


@torch.no_grad()
def scores_at(qs: QuietStar, tokens: torch.Tensor, at: torch.Tensor, thought_ids: torch.Tensor | None = None) -> dict:
    """token_scores for the positions at (B, K) only (each with a next token), thinking there alone: nll_base,
    nll_thought, mix_weight (B, K) and thought_ids (B, K, L). Far cheaper when only a few positions matter (the
    digits of a bare answer); equal to token_scores there (tests/test_think_at.py)."""
    h_base, h_end, ids = end_hidden(qs, tokens, thought_ids, at)                # h_end (B, K, D)
    h_same = at_streams(h_base.transpose(1, 2), at).transpose(1, 2)              # h_base at the same positions
    mix_weight, targets = qs.mixing_head(h_same, h_end), tokens.gather(1, at + 1)
    return {"nll_base": -qs._token_logp(h_same, targets),
            "nll_thought": -qs._token_logp(mix(h_same, h_end, mix_weight), targets),
            "mix_weight": mix_weight[..., 0], "thought_ids": ids}


@torch.no_grad()
def token_scores(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor | None = None) -> dict:
    """Per-token view, for evaluation and the thoughts page: nll_base and nll_thought (B, T-1), the NLL
    of x_{i+1} without / after the thought at i; mix_weight (B, T-1); thought_ids (B, T, L)."""
    p = predict(qs, tokens, thought_ids)
    nll = {name: -qs._token_logp(p[h][:, :-1], tokens[:, 1:])
           for name, h in (("nll_base", "h_base"), ("nll_thought", "h_mixed"))}
    return nll | {"mix_weight": p["mix_weight"][:, :-1], "thought_ids": p["thought_ids"]}


# ---- the official "soft" answer score -------------------------------------------------------------------

@torch.no_grad()
def answer_scores(qs: QuietStar, tokenizer, task: str, rows: list[dict], batch_size: int = 4) -> dict:
    """Per question, with and without thoughts (the same sampled-thought forward gives both): the official soft
    score and exact match (soft_score). Scored: every token after "A:" that is in the allowed set (the official
    code skips the lone space before a number and the comma in "1,000" the same way)."""
    allowed = allowed_token_ids(tokenizer, ANSWER_SYMBOLS[task])
    allowed_set = set(allowed.tolist())
    device = qs.model.embed_tokens.weight.device
    results = {"thoughts": [], "no_thoughts": []}
    for start in tqdm(range(0, len(rows), batch_size), desc=f"{task} answers", unit="batch", leave=False):
        batch = [qa_prompt(task, row) for row in rows[start:start + batch_size]]
        encodings = [tokenizer.encode(prompt + answer) for prompt, answer in batch]
        width = max(len(e.ids) for e in encodings)
        tokens = torch.zeros(len(batch), width, dtype=torch.long, device=device)  # right padding never
        for b, e in enumerate(encodings):                                        # reaches earlier tokens
            tokens[b, :len(e.ids)] = torch.tensor(e.ids, device=device)
        predicted = predict(qs, tokens)
        for b, ((prompt, _), e) in enumerate(zip(batch, encodings)):
            scored = [j for j, (s, _) in enumerate(e.offsets) if s >= len(prompt) and e.ids[j] in allowed_set]
            for key, h in (("thoughts", "h_mixed"), ("no_thoughts", "h_base")):
                soft, exact = soft_score(qs.model.lm_head(predicted[h][b]), e.ids, scored, allowed)
                results[key].append({"soft": soft, "exact": exact})
    return {key: {"soft": mean(r["soft"] for r in rs), "exact": mean(r["exact"] for r in rs), "n": len(rs)}
            for key, rs in results.items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


# ---- GSM8K by generation ------------------------------------------------------------------------------

def first_integer(text: str) -> str | None:
    match = re.search(r"-?\d[\d,]*", text)
    return match.group().replace(",", "") if match else None


@torch.no_grad()
def gsm8k_generation(qs: QuietStar, tokenizer, rows: list[dict], votes: int, max_new_tokens: int, seed: int) -> dict:
    """Zero-shot chain of thought, then the answer prompt (the official zero-shotcot-eval.py); majority vote."""
    from generate import generate_with_thoughts
    temperature = 0.9 if votes > 1 else 0.0
    out = {}
    for thinking in (True, False):
        correct, speeds, examples = 0, [], []
        for q, row in enumerate(tqdm(rows, desc=f"gsm8k generation, thinking {'on' if thinking else 'off'}",
                                     leave=False)):
            answers = []
            for v in range(votes):
                prompt = f"Q: {row['question']}\nA: Let's think step by step."
                reasoning = generate_with_thoughts(qs, tokenizer, prompt, max_new_tokens, temperature,
                                                   seed=seed + 1000 * q + v, thinking=thinking,
                                                   stop=["\nQ:", "\n\n\n"])
                final = generate_with_thoughts(qs, tokenizer, prompt + reasoning.text +
                                               "\nTherefore, the answer (arabic numerals) is", 12, temperature,
                                               seed=seed + 1000 * q + v, thinking=thinking)
                answers.append(first_integer(final.text))
                speeds.append(reasoning.tokens_per_s)
            vote = Counter(a for a in answers if a is not None).most_common(1)
            correct += bool(vote) and vote[0][0] == gold_number(row)
            if q < 3:
                examples.append({"question": row["question"], "reasoning": reasoning.text, "answer": answers})
        out["thoughts" if thinking else "no_thoughts"] = {"exact": correct / max(1, len(rows)), "n": len(rows),
                                                          "tokens_per_s": mean(speeds), "examples": examples}
    return out


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


def filler_token_id(tokenizer) -> int:
    return tokenizer.encode(".", add_special_tokens=False).ids[0]


def donor_thoughts(thought_ids: torch.Tensor) -> torch.Tensor:
    """(W, T, L) thoughts of W windows -> other texts' thoughts, position by position: window w gets w+1's."""
    if len(thought_ids) > 1:
        return thought_ids.roll(-1, dims=0)
    return thought_ids.roll(thought_ids.shape[1] // 2, dims=1)


def oracle_thoughts(tokenizer, windows: torch.Tensor, focus: torch.Tensor, length: int, filler_id: int):
    """The oracle thought before each bare answer of windows (W, T) aligned on them: at every position whose next
    token is an answer digit (focus (W, T-1)), the last worked step of the window's last question, its last
    `length` tokens, filler-padded in front; filler elsewhere. -> ids (W, T, length), found (W,) bool."""
    ids = torch.full((*windows.shape, length), filler_id, dtype=torch.long)
    found = torch.zeros(len(windows), dtype=torch.bool)
    for w in range(len(windows)):
        where = focus[w].nonzero()[:, 0]
        if len(where) == 0:
            continue
        question = tokenizer.decode(windows[w, :int(where[0]) + 1].tolist()).rpartition("Q:")[2]
        steps = worked_steps(question)
        if steps is None:                                         # the question is cut off by the window
            continue
        step = tokenizer.encode(steps.split(" ")[-1], add_special_tokens=False).ids[-length:]
        ids[w, where] = torch.tensor([filler_id] * (length - len(step)) + step)
        found[w] = True
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
    """score_thoughts for the focus tokens (W, T-1) only, each window thinking at its focus positions alone
    (scores_at): the same keys and shapes, 0 (and filler thoughts) wherever focus is False."""
    at = focus_positions(focus).to(windows.device)                              # (W, K)
    L, W, T = qs.config.thought_len, *windows.shape
    batches = range(0, W, batch_size)
    sampled = [scores_at(qs, windows[i:i + batch_size], at[i:i + batch_size]) for i in batches]
    ids = torch.cat([s["thought_ids"] for s in sampled])                        # (W, K, L)
    given = {"filler": torch.full_like(ids, filler_id), "shuffled": donor_thoughts(ids)}
    if oracle is not None:
        given["oracle"] = oracle.to(windows.device).gather(1, at[..., None].expand(-1, -1, L))
    nll = {"none": torch.cat([s["nll_base"] for s in sampled]), "sampled": torch.cat([s["nll_thought"] for s in sampled])}
    for name, thoughts in given.items():
        nll[name] = torch.cat([scores_at(qs, windows[i:i + batch_size], at[i:i + batch_size],
                                         thoughts[i:i + batch_size])["nll_thought"] for i in batches])

    def spread(values: torch.Tensor, fill=0.0) -> torch.Tensor:                # (W, K, ..) -> (W, T-1 or T, ..)
        width = T if values.dim() == 3 else T - 1
        out = values.new_full((W, width, *values.shape[2:]), fill)
        out[torch.arange(W, device=values.device)[:, None], at] = values
        return out.cpu()
    outside = ~focus.cpu()                                                      # padding rows of `at` included
    return {p: spread(v.float()).masked_fill(outside, 0) for p, v in nll.items()} | {
        "mix_weight": spread(torch.cat([s["mix_weight"] for s in sampled]).float()).masked_fill(outside, 0),
        "thought_ids": spread(ids, filler_id), "donor_ids": spread(given["shuffled"], filler_id)}


@torch.no_grad()
def score_thoughts(qs: QuietStar, windows: torch.Tensor, filler_id: int, batch_size: int = 4,
                   oracle: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """windows (W, T) -> per-token NLL of x_{i+1} (W, T-1) under each of PREDICTORS (oracle: if its thoughts
    (W, T, L) are given), and the mixing weight of the sampled thought (W, T-1). Uses the global torch RNG for
    the sampled thoughts."""
    L = qs.config.thought_len
    batches = range(0, len(windows), batch_size)
    nll, weight, sampled_ids = {p: [] for p in PREDICTORS if p != "oracle" or oracle is not None}, [], []
    for i in tqdm(batches, desc="held-out NLL: sampled thoughts", unit="batch", leave=False):
        scores = token_scores(qs, windows[i:i + batch_size])
        nll["none"].append(scores["nll_base"].float())
        nll["sampled"].append(scores["nll_thought"].float())
        weight.append(scores["mix_weight"].float())
        sampled_ids.append(scores["thought_ids"])
    donors = donor_thoughts(torch.cat(sampled_ids))
    for i in tqdm(batches, desc="held-out NLL: controls", unit="batch", leave=False):
        w = windows[i:i + batch_size]
        filler = torch.full((*w.shape, L), filler_id, dtype=torch.long, device=w.device)
        nll["filler"].append(token_scores(qs, w, filler)["nll_thought"].float())
        nll["shuffled"].append(token_scores(qs, w, donors[i:i + batch_size])["nll_thought"].float())
        if oracle is not None:
            nll["oracle"].append(token_scores(qs, w, oracle[i:i + batch_size])["nll_thought"].float())
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


@torch.no_grad()
def thought_rewards_at(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor | None = None):
    """Steps 1-4 with one thought per position: -> rewards {"mixed", "thought"} (B, T) (training's reward from
    each source), the thought ids (B, T, L), and where the model thinks and a next token exists (B, T)."""
    B, T = tokens.shape
    ok = torch.ones(B, T - 1, dtype=torch.bool, device=tokens.device)
    h_base, cache = qs.base_pass(tokens)
    logp_base = qs._token_logp(h_base[:, :-1], tokens[:, 1:])
    ids, _ = qs.think(tokens, cache, 1, thought_ids)
    talk = qs.talk(tokens, h_base, cache, 1)
    rewards, _ = qs.rewards(tokens, ok, logp_base, talk, torch.arange(T, device=tokens.device).expand(B, T), 1)
    where = F.pad(ok, (0, 1))
    if qs.config.think_fraction is not None:
        where &= torch.zeros_like(where).scatter(1, chosen_positions(qs, h_base), True)
    return rewards, ids, where


def content_reward(qs: QuietStar, windows: torch.Tensor, batch_size: int = 4, seed: int = 0) -> dict:
    """The reward of the sampled thought minus that of a thought sampled for another window at the same position
    (donor_thoughts), where the model thinks: what the thought says, in training's own currency. Per reward
    source: (mean, 95% low, 95% high), bootstrap over windows."""
    batches = range(0, len(windows), batch_size)
    sampled = [thought_rewards_at(qs, windows[i:i + batch_size]) for i in batches]
    donors = donor_thoughts(torch.cat([ids for _, ids, _ in sampled]))
    shuffled = [thought_rewards_at(qs, windows[i:i + batch_size], donors[i:i + batch_size])[0] for i in batches]
    where = torch.cat([w for _, _, w in sampled]).cpu()
    return {source: paired_difference(torch.cat([r[source] for r, _, _ in sampled]).float().cpu(),
                                      torch.cat([r[source] for r in shuffled]).float().cpu(), where, seed=seed)
            for source in ("mixed", "thought")}


def evaluation_row(qs: QuietStar, tokenizer, name: str, windows: torch.Tensor, focus: torch.Tensor,
                   filler_id: int, batch_size: int = 4) -> dict:
    """train.py's evaluation of one held-out set, as a metrics row. "text" (consecutive windows): the NLLs of the
    predictors on all tokens and the hardest 10%, and the content reward. "answer" (windows aligned on bare
    answers): the five predictors on the answer digits, and how often the thought before an answer writes it."""
    row = {}
    if name == "text":
        result = compare_thoughts(score_thoughts(qs, windows, filler_id, batch_size))
        for prefix, subset in (("eval_", "all"), ("eval_hard_", "hard")):
            row |= {f"{prefix}nll_{p}": round(v, 6) for p, v in result[subset]["nll"].items()}
            row[f"{prefix}diff"] = {k: [round(x, 6) for x in v] for k, v in result[subset]["diff"].items()}
        row["eval_mix_weight"] = round(result["mix_weight"], 6)
        row["eval_content_reward"] = {k: [round(x, 6) for x in v] for k, v in content_reward(qs, windows).items()}
        return row
    targets = focus[:, 1:]
    oracle, found = oracle_thoughts(tokenizer, windows.cpu(), targets, qs.config.thought_len, filler_id)
    scores = score_focus(qs, windows, targets.to(windows.device), filler_id, 4 * batch_size, oracle)  # a few streams each
    result = compare_thoughts(scores, targets & found[:, None], focus_only=True)
    if "focus" in result:
        row |= {f"eval_answer_nll_{p}": round(v, 6) for p, v in result["focus"]["nll"].items()}
        row["eval_answer_diff"] = {k: [round(x, 6) for x in v] for k, v in result["focus"]["diff"].items()}
    hits = answer_thoughts(tokenizer, windows.cpu(), targets, scores)
    row["eval_thought_accuracy"] = [round(hits["answer_in_sampled_thought"], 6),
                                    round(hits["answer_in_shuffled_thought"], 6), hits["n"]]
    if qs.config.think_fraction is not None:         # does training think there? (think_at entropy:Q)
        row["eval_answer_selected"] = round(answers_selected(qs, windows, targets.to(windows.device)), 6)
    return row


@torch.no_grad()
def answers_selected(qs: QuietStar, windows: torch.Tensor, focus: torch.Tensor, batch_size: int = 16) -> float:
    """The fraction of bare answers whose first digit training would think before (think_at entropy:Q): if it is
    low, the policy never practises where the oracle says a thought could help."""
    first = focus.int().argmax(dim=1)                                            # (W,)
    chosen = []
    for i in range(0, len(windows), batch_size):
        h_base, _ = qs.base_pass(windows[i:i + batch_size])
        chosen.append((chosen_positions(qs, h_base) == first[i:i + batch_size, None]).any(dim=1))
    return torch.cat(chosen).float().mean().item()


def answer_thoughts(tokenizer, windows: torch.Tensor, focus: torch.Tensor, scores: dict, shown: int = 12) -> dict:
    """Read the thoughts sampled just before each answer's first digit (windows aligned on the answers): how often
    the thought writes the answer itself (the whole number), against the thought of another problem at the same
    place (the shuffled control), and a few examples. focus (W, T-1) marks target positions."""
    first = focus.int().argmax(dim=1)                                      # the position predicting digit 1
    hits, examples, per_answer = {"sampled": 0, "shuffled": 0}, [], []
    for n, i in enumerate(first.tolist()):
        answer = tokenizer.decode(windows[n, i + 1:i + 1 + int(focus[n].sum())].tolist())
        sampled = tokenizer.decode(scores["thought_ids"][n, i].tolist())
        donor = tokenizer.decode(scores["donor_ids"][n, i].tolist())
        whole = re.compile(rf"(?<!\d){re.escape(answer.strip())}(?!\d)")      # the number, not a digit of one
        per_answer.append(int(bool(whole.search(sampled))))
        hits["sampled"] += per_answer[-1]
        hits["shuffled"] += bool(whole.search(donor))
        if len(examples) < shown:
            examples.append({"before": tokenizer.decode(windows[n, max(0, i - 24):i + 1].tolist()),
                             "thought": sampled, "answer": answer})
    count = max(1, len(first))
    return {"n": len(first), "answer_in_sampled_thought": hits["sampled"] / count,
            "answer_in_shuffled_thought": hits["shuffled"] / count, "examples": examples,
            "sampled_hits": per_answer}


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
    """Held-out text -> compare_thoughts on (the first text_windows) consecutive windows, plus, when `focus`
    (text -> character spans) is given, on windows aligned on the focus tokens (bare answers), with what the
    thoughts before them wrote (answer_thoughts)."""
    eos = (qs.model.config.eos_ids or [None])[0]
    device = qs.model.embed_tokens.weight.device
    stream = TokenWindows(texts, tokenizer, seq_len, eos, seed=0, focus=focus)
    filler = filler_token_id(tokenizer)
    windows, window_focus = stream.windows(text_windows or 10**9)
    windows = torch.from_numpy(windows).to(device)
    result = {"text": compare_thoughts(score_thoughts(qs, windows, filler, batch_size),
                                       torch.from_numpy(window_focus[:, 1:])),
              "content_reward": content_reward(qs, windows, batch_size)}
    if focus is not None:
        windows, window_focus = stream.focus_windows(10**9)
        if len(windows):
            targets = torch.from_numpy(window_focus[:, 1:])
            oracle, found = oracle_thoughts(tokenizer, torch.from_numpy(windows), targets, qs.config.thought_len, filler)
            scores = score_focus(qs, torch.from_numpy(windows).to(device), targets.to(device), filler,
                                 4 * batch_size, oracle)                          # a few streams per window
            result["answers"] = compare_thoughts(scores, targets & found[:, None], focus_only=True)  # with an oracle
            result["answer_thoughts"] = answer_thoughts(tokenizer, torch.from_numpy(windows), targets, scores)
            if qs.config.think_fraction is not None:
                result["answers_selected"] = answers_selected(qs, torch.from_numpy(windows).to(device), targets.to(device))
    return result


# ---- thoughts for display -------------------------------------------------------------------------------

@torch.no_grad()
def thought_records(qs: QuietStar, tokenizer, tokens: torch.Tensor, filler_id: int) -> list[dict]:
    """One text (T,) -> a record per token for thoughts_page: its text, the thought sampled before it (at the
    previous position), the mixing weight, how much the thought changed its NLL (negative = helped), and how
    much a filler thought of the same length changed it: where the two differ, the content mattered."""
    scores = token_scores(qs, tokens[None])
    filler_ids = torch.full_like(scores["thought_ids"], filler_id)
    filler = token_scores(qs, tokens[None], filler_ids)["nll_thought"][0]
    records = [{"text": tokenizer.decode([tokens[0].item()]), "thought": "", "mix_weight": None,
                "delta_nll": None, "delta_nll_filler": None, "nll_base": None}]
    for i in range(1, len(tokens)):
        base, after = scores["nll_base"][0, i - 1].item(), scores["nll_thought"][0, i - 1].item()
        records.append({"text": tokenizer.decode([tokens[i].item()]),
                        "thought": tokenizer.decode(scores["thought_ids"][0, i - 1].tolist()),
                        "mix_weight": scores["mix_weight"][0, i - 1].item(), "delta_nll": after - base,
                        "delta_nll_filler": filler[i - 1].item() - base, "nll_base": base})
    return records


# ---- command line ---------------------------------------------------------------------------------------

def thoughts_page_path(args) -> Path:
    """--out, else thoughts.html inside the model's folder when it is a checkpoint (or a training run), else
    thoughts-<name>.html here: never a folder named like a model, which would shadow the model's name."""
    if args.out:
        return Path(args.out)
    folder = Path(args.model).expanduser()
    if folder.is_dir() and ((folder / "latest").is_file() or (folder / "quietstar.json").is_file()):
        return folder / "thoughts.html"
    return Path(f"thoughts-{Path(args.model).name}.html")


def write_page(args) -> Path:
    from machinery.thoughts_page import write_thoughts_page
    text = (arithmetic_texts(8, seed=HELDOUT_SEED + args.seed, bare_fraction=args.bare_fraction, kinds=args.problems)
            if args.data == "arithmetic" else read_texts(args.data, limit=1))
    out = thoughts_page_path(args)
    check_writable(out, "--out")
    qs, tokenizer = load_model(args)
    torch.manual_seed(args.seed)
    device = qs.model.embed_tokens.weight.device
    tokens = torch.tensor(tokenizer.encode("".join(text)).ids[:args.seq_len], device=device)
    if len(tokens) < 2:
        raise UsageError(f"--data {args.data}: the text has {len(tokens)} token(s); the page needs at least 2")
    metrics = Path(args.model) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    records = thought_records(qs.eval(), tokenizer, tokens, filler_token_id(tokenizer))
    return write_thoughts_page(out, records, rows, title=f"Quiet-STaR thoughts: {args.model}")


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
        for name in ("text", "answers"):
            if name in result:
                print(f"{'consecutive windows' if name == 'text' else 'windows aligned on the bare answers'}:")
                print(format_comparison(result[name]))
        if "content_reward" in result:
            print("content reward (reward of the sampled thought - of another window's thought, where it thinks): " +
                  ", ".join(f"{k} {m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for k, (m, lo, hi) in result["content_reward"].items()))
        if "answer_thoughts" in result:
            a = result["answer_thoughts"]
            print(f"thoughts before an answer's first digit that write the answer: {a['answer_in_sampled_thought']:.3f}"
                  f" (a thought of another problem: {a['answer_in_shuffled_thought']:.3f}; n = {a['n']})")
            for e in a["examples"][:4]:
                print(f"  {e['before'][-30:]!r} [{e['thought']!r}] {e['answer']!r}")
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
            print(f"wrote {write_page(args)}")
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
