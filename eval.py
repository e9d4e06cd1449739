"""Evaluate a checkpoint with and without thoughts, on the same questions, side by side.

    python eval.py --model=out --task=gsm8k --data=../shared/data/gsm8k/test.jsonl --limit=200 --out=gsm8k.json
    python eval.py --model=out --task=csqa  --data=../shared/data/commonsense_qa/validation.jsonl --limit=200
    python eval.py --model=out --task=gsm8k_gen --data=../shared/data/gsm8k/test.jsonl --limit=20 --votes=1
    python eval.py --model=out --task=nll   --data=../shared/data/c4/c4_en_sample_900.jsonl --limit=50

Tasks (reference doc section 5):
  gsm8k, csqa  the official protocol: "Q: ...\\nA: <answer>\\n", the teacher-forced probability of the gold
               answer tokens, each renormalised over the allowed answer tokens (digits and newline; A-E and
               newline), multiplied over the answer ("soft"); "exact" counts answers whose every token is the
               most likely allowed one. With thoughts: one sampled thought before every token, mixed.
  gsm8k_gen    zero-shot "Let's think step by step", then "Therefore, the answer (arabic numerals) is", the
               first integer against the gold one; optional majority vote over --votes samples.
  nll          held-out text: mean next-token NLL without / with thoughts, overall and on the hardest 10%
               of tokens by base NLL (the paper's difficult tokens).
  thoughts     the thoughts page (thoughts_page.py) for the first --seq_len tokens of --data ("arithmetic"
               or a .txt/.jsonl file), with the training curves of <model>/metrics.jsonl if there is one:
               python eval.py --model=out --task=thoughts --data=arithmetic --out=out/thoughts.html
"""

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from data import TokenWindows, gsm8k_text
from qstar import QuietStar

TASKS = ("gsm8k", "csqa", "gsm8k_gen", "nll", "thoughts")
HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main", "test"), "csqa": ("tau/commonsense_qa", None, "validation")}


# ---- data ---------------------------------------------------------------------------------------------

def read_rows(task: str, data: str, limit: int | None) -> list[dict]:
    """Rows of a local .jsonl file, or of the task's Hub dataset when `data` names it (needs `datasets`)."""
    path = Path(data).expanduser()
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif data in ("hub", *(spec[0] for spec in HUB_DATASETS.values())) and task in HUB_DATASETS:
        import datasets
        name, config, split = HUB_DATASETS[task]
        rows = list(datasets.load_dataset(name, config, split=split))
    else:
        raise FileNotFoundError(f"--data {data!r} is not a file. Here the data is in ../shared/data "
                                f"(gsm8k/test.jsonl, commonsense_qa/validation.jsonl, c4/c4_en_sample_900.jsonl)")
    needed = {"gsm8k": {"question", "answer"}, "gsm8k_gen": {"question", "answer"},
              "csqa": {"question", "choices", "answerKey"}}.get(task, set())
    if rows and not needed <= rows[0].keys():
        raise ValueError(f"{data} does not look like {task} data: rows need {sorted(needed)}, have {sorted(rows[0])}")
    return rows[:limit] if limit else rows


def gold_number(row: dict) -> str:
    return row["answer"].split("####")[-1].strip().replace(",", "")


def qa_prompt(task: str, row: dict) -> tuple[str, str]:
    """(prompt, answer) in the official evaluation format."""
    if task == "gsm8k":
        return f"Q: {row['question']}\nA:", f" {gold_number(row)}\n"
    choices = "\n".join(f"({label}) {text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"]))
    return f"Q: {row['question']}\n{choices}\nA:", f" {row['answerKey']}\n"


def allowed_token_ids(tokenizer, symbols: str) -> torch.Tensor:
    """Ids of the tokens that read as one of `symbols` (with or without leading spaces) or as a newline."""
    ids = [i for i in range(tokenizer.get_vocab_size())
           if tokenizer.decode([i]).lstrip(" ") in symbols or tokenizer.decode([i]) == "\n"]
    return torch.tensor(ids)


# ---- the official "soft" answer score -------------------------------------------------------------------

@torch.no_grad()
def answer_scores(qs: QuietStar, tokenizer, task: str, rows: list[dict], batch_size: int = 4) -> dict:
    """Per question, with and without thoughts (the same sampled-thought forward gives both): the product of
    the renormalised probabilities of the gold answer tokens, and whether each one is the top allowed token."""
    allowed = allowed_token_ids(tokenizer, "0123456789" if task == "gsm8k" else "ABCDE")
    allowed_index = {token: k for k, token in enumerate(allowed.tolist())}
    device = qs.model.embed_tokens.weight.device
    results = {"thoughts": [], "no_thoughts": []}
    for start in tqdm(range(0, len(rows), batch_size), desc=f"{task} answers", unit="batch", leave=False):
        batch = [qa_prompt(task, row) for row in rows[start:start + batch_size]]
        encodings = [tokenizer.encode(prompt + answer) for prompt, answer in batch]
        width = max(len(e.ids) for e in encodings)
        tokens = torch.zeros(len(batch), width, dtype=torch.long, device=device)  # right padding never
        for b, e in enumerate(encodings):                                        # reaches earlier tokens
            tokens[b, :len(e.ids)] = torch.tensor(e.ids)
        predicted = qs.predict(tokens)
        for b, ((prompt, _), e) in enumerate(zip(batch, encodings)):
            # the answer tokens: those starting after the prompt and in the allowed set (skips " " and ",")
            scored = [j for j, (s, _) in enumerate(e.offsets) if s >= len(prompt) and e.ids[j] in allowed_index]
            if not scored:  # nothing to score counts as wrong (the official product stays 1: "correct")
                for key in results:
                    results[key].append({"soft": 0.0, "exact": False})
                continue
            for key, h in (("thoughts", "h_mixed"), ("no_thoughts", "h_base")):
                logits = qs.model.lm_head(predicted[h][b, [j - 1 for j in scored]]).float()[:, allowed]
                probs = logits.softmax(dim=-1)                                  # renormalised over allowed
                gold = torch.tensor([allowed_index[e.ids[j]] for j in scored], device=device)
                results[key].append({"soft": probs[torch.arange(len(scored)), gold].prod().item(),
                                     "exact": bool((probs.argmax(-1) == gold).all())})
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
    """Zero-shot chain of thought, then the answer prompt (reference doc section 5.2); majority vote."""
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


# ---- held-out NLL ---------------------------------------------------------------------------------------

@torch.no_grad()
def nll_with_and_without_thoughts(qs: QuietStar, windows: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """windows (N, T) token ids -> mean NLL of every next token without a thought and after one sampled
    thought, overall and on the hardest 10% of tokens by base NLL (the paper's difficult tokens)."""
    base, thought, weight = [], [], []
    for i in tqdm(range(0, len(windows), batch_size), desc="held-out NLL", unit="batch", leave=False):
        scores = qs.token_scores(windows[i:i + batch_size])
        base.append(scores["nll_base"].flatten().float())
        thought.append(scores["nll_thought"].flatten().float())
        weight.append(scores["mix_weight"].flatten().float())
    base, thought = torch.cat(base), torch.cat(thought)
    hard = base >= base.quantile(0.9)
    return {"nll_base": base.mean().item(), "nll_thought": thought.mean().item(),
            "hard_nll_base": base[hard].mean().item(), "hard_nll_thought": thought[hard].mean().item(),
            "mix_weight": torch.cat(weight).mean().item(), "n_tokens": base.numel()}


def heldout_nll(qs: QuietStar, tokenizer, rows: list[dict], seq_len: int, batch_size: int) -> dict:
    texts = [row["text"] if "text" in row else gsm8k_text(row) for row in rows]
    eos = (qs.model.config.eos_ids or [None])[0]
    windows = TokenWindows(texts, tokenizer, seq_len, eos, seed=0).windows(10**9)
    r = nll_with_and_without_thoughts(qs, torch.from_numpy(windows).to(qs.model.embed_tokens.weight.device), batch_size)
    return {"thoughts": {"nll": r["nll_thought"], "hard_nll": r["hard_nll_thought"], "mix_weight": r["mix_weight"]},
            "no_thoughts": {"nll": r["nll_base"], "hard_nll": r["hard_nll_base"]}, "n_tokens": r["n_tokens"]}


# ---- thoughts for display -------------------------------------------------------------------------------

@torch.no_grad()
def thought_records(qs: QuietStar, tokenizer, tokens: torch.Tensor) -> list[dict]:
    """One text (T,) -> a record per token for thoughts_page: its text, the thought sampled before it (at the
    previous position), the mixing weight, and how much the thought changed its NLL (negative = helped)."""
    scores = qs.token_scores(tokens[None])
    records = [{"text": tokenizer.decode([tokens[0].item()]), "thought": "", "mix_weight": None,
                "delta_nll": None, "nll_base": None}]
    for i in range(1, len(tokens)):
        base, after = scores["nll_base"][0, i - 1].item(), scores["nll_thought"][0, i - 1].item()
        records.append({"text": tokenizer.decode([tokens[i].item()]),
                        "thought": tokenizer.decode(scores["thought_ids"][0, i - 1].tolist()),
                        "mix_weight": scores["mix_weight"][0, i - 1].item(), "delta_nll": after - base,
                        "nll_base": base})
    return records


# ---- command line ---------------------------------------------------------------------------------------

def thoughts_page(args) -> str:
    from data import read_texts
    from thoughts_page import write_thoughts_page
    overrides = {"thought_len": args.thought_len} if args.thought_len is not None else {}
    text = read_texts(args.data, limit=1 if args.data != "arithmetic" else 8)
    qs, tokenizer = QuietStar.from_pretrained(args.model, **overrides)
    torch.manual_seed(args.seed)
    tokens = torch.tensor(tokenizer.encode("".join(text)).ids[:args.seq_len])
    metrics = Path(args.model) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    out = args.out or str(Path(args.model) / "thoughts.html")
    return str(write_thoughts_page(out, thought_records(qs.eval(), tokenizer, tokens), rows,
                                   title=f"Quiet-STaR thoughts: {args.model}"))


def run(args) -> dict:
    overrides = {"thought_len": args.thought_len} if args.thought_len is not None else {}
    rows = read_rows(args.task, args.data, args.limit)
    qs, tokenizer = QuietStar.from_pretrained(args.model, **overrides)
    qs.eval()
    torch.manual_seed(args.seed)
    started = time.time()
    if args.task in ("gsm8k", "csqa"):
        result = answer_scores(qs, tokenizer, args.task, rows, args.batch_size)
    elif args.task == "gsm8k_gen":
        result = gsm8k_generation(qs, tokenizer, rows, args.votes, args.max_new_tokens, args.seed)
    else:
        result = heldout_nll(qs, tokenizer, rows, args.seq_len, args.batch_size)
    return {"task": args.task, "model": str(args.model), "data": args.data, "limit": args.limit, "n": len(rows),
            "thought_len": qs.config.thought_len, "seed": args.seed, "seconds": round(time.time() - started, 1),
            **result}


def print_table(result: dict):
    metrics = [k for k in result["no_thoughts"] if k not in ("n", "examples", "tokens_per_s")]
    print(f"\n{result['task']} on {result['n']} items, {result['model']} (thought length {result['thought_len']}, "
          f"{result['seconds']} s)")
    print(f"{'':14}" + "".join(f"{m:>12}" for m in metrics))
    for key in ("no_thoughts", "thoughts"):
        print(f"{key:14}" + "".join(f"{result[key][m]:>12.4f}" for m in metrics))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="checkpoint folder, built-in name or Hub id")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", required=True, help="a local .jsonl file, or 'hub' for the task's Hub dataset "
                                                      "(thoughts: also 'arithmetic' or a .txt file)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions / documents")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--thought_len", type=int, default=None, help="override the checkpoint's thought length")
    parser.add_argument("--votes", type=int, default=1, help="gsm8k_gen: samples per question, majority vote")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="gsm8k_gen: reasoning length")
    parser.add_argument("--seq_len", type=int, default=128, help="nll: window length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.task == "thoughts":
            print(f"wrote {thoughts_page(args)}")
            return 0
        result = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
