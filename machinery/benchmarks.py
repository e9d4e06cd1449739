"""GSM8K and CommonsenseQA with and without thoughts (eval.py's tasks gsm8k, csqa and gsm8k_gen).

gsm8k, csqa: the official protocol (docs/official_code.md): "Q: ...\nA: <answer>\n", the teacher-forced probability of
the gold answer tokens, each renormalised over the allowed tokens (the digits' or letters' own tokens and the
newline), multiplied over the answer ("soft"); "exact" counts answers whose every token is the most likely allowed
one. With thoughts: one sampled thought before every token, mixed (generate.predict).
gsm8k_gen: zero-shot "Let's think step by step", then "Therefore, the answer (arabic numerals) is", the first
integer against the gold one; optional majority vote over --votes samples.
"""

import re
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from data import read_jsonl
from generate import generate_with_thoughts, predict
from qstar import QuietStar

HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main", "test"), "csqa": ("tau/commonsense_qa", None, "validation")}
ANSWER_SYMBOLS = {"gsm8k": "0123456789", "csqa": "ABCDE"}


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


def first_integer(text: str) -> str | None:
    match = re.search(r"-?\d[\d,]*", text)
    return match.group().replace(",", "") if match else None


@torch.no_grad()
def gsm8k_generation(qs: QuietStar, tokenizer, rows: list[dict], votes: int, max_new_tokens: int, seed: int) -> dict:
    """Zero-shot chain of thought, then the answer prompt (the official zero-shotcot-eval.py); majority vote."""
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
