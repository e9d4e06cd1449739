"""Training and evaluation text: a built-in generator of arithmetic word problems, local files, the Hub.

The default text has to come from the project itself (third-party datasets cannot be committed), and it
should contain tokens that thinking can help with. Worked arithmetic word problems do: the digits of each
result are hard to predict without computing, and the question and the worked steps before them hold
everything a thought needs.

    Q: Maya has 23 marbles. She buys 4 bags with 6 marbles each. How many marbles does she have now?
    A: 4*6=24. 23+24=47. The answer is 47.

Equations are written without spaces ("23+19=42": 8 tokens instead of 11), so that a short thought can hold one.
"""

import json
import random
import re
from pathlib import Path

import numpy as np

NAMES = ["Maya", "Tom", "Aisha", "Luis", "Priya", "Ben", "Chen", "Sara", "Omar", "Lena", "Kofi", "Ivy"]
THINGS = ["marbles", "apples", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards"]


KINDS = ("add", "sub", "mul", "multi")      # a + d, a - d, b * c, and a + b * c - d in three steps


def arithmetic_problem(rng: random.Random, bare: bool = False, kinds: tuple[str, ...] = KINDS) -> str:
    """One word problem with one to three steps of +, - and *: worked ("A: 4*6=24. ... The answer is 47.")
    or, with bare=True, with the answer alone ("A: 47."), the form in which only a thought can do the work."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = KINDS.index(rng.choice(kinds))
    a, b, c = rng.randint(11, 89), rng.randint(2, 9), rng.randint(2, 12)
    if kind == 0:
        d = rng.randint(11, 89)
        question = f"{name} has {a} {thing} and finds {d} more. How many {thing} does {name} have?"
        steps, answer = f"{a}+{d}={a + d}.", a + d
    elif kind == 1:
        d = rng.randint(2, a - 1)
        question = f"{name} has {a} {thing} and gives away {d}. How many {thing} are left?"
        steps, answer = f"{a}-{d}={a - d}.", a - d
    elif kind == 2:
        question = f"{name} buys {b} bags with {c} {thing} each. How many {thing} is that?"
        steps, answer = f"{b}*{c}={b * c}.", b * c
    else:
        total = a + b * c
        d = rng.randint(2, total - 1)
        question = (f"{name} has {a} {thing}, buys {b} bags with {c} {thing} each, then gives away {d}. "
                    f"How many {thing} does {name} have now?")
        steps, answer = f"{b}*{c}={b * c}. {a}+{b * c}={total}. {total}-{d}={total - d}.", total - d
    if bare:
        return f"Q: {question}\nA: {answer}.\n"
    return f"Q: {question}\nA: {steps} The answer is {answer}.\n"


def arithmetic_texts(n: int, seed: int, bare_fraction: float = 0.0, kinds: str | tuple[str, ...] = KINDS) -> list[str]:
    """n problems of the given kinds (a tuple, or "all" / a comma list such as "mul"); each one bare (answer
    only) with probability bare_fraction, else worked."""
    kinds = parse_kinds(kinds)
    rng = random.Random(seed)
    return [arithmetic_problem(rng, bare_fraction > 0 and rng.random() < bare_fraction, kinds) for _ in range(n)]


def parse_kinds(kinds: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(kinds, tuple):
        return kinds
    chosen = KINDS if kinds == "all" else tuple(k.strip() for k in kinds.split(","))
    unknown = sorted(set(chosen) - set(KINDS))
    if unknown or not chosen:
        raise ValueError(f"--problems {kinds!r}: choose 'all' or a comma list of {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in chosen)


# The four question templates of arithmetic_problem, read back: a bare problem's worked steps, for the oracle thought.
QUESTIONS = (
    (re.compile(r"has (\d+) \w+, buys (\d+) bags with (\d+) \w+ each, then gives away (\d+)\."),
     lambda a, b, c, d: f"{b}*{c}={b * c}. {a}+{b * c}={a + b * c}. {a + b * c}-{d}={a + b * c - d}."),
    (re.compile(r"has (\d+) \w+ and finds (\d+) more\."), lambda a, d: f"{a}+{d}={a + d}."),
    (re.compile(r"has (\d+) \w+ and gives away (\d+)\."), lambda a, d: f"{a}-{d}={a - d}."),
    (re.compile(r"buys (\d+) bags with (\d+) \w+ each\. How many"), lambda b, c: f"{b}*{c}={b * c}."),
)


def worked_steps(question: str) -> str | None:
    """The worked steps of a built-in problem from its question ("... has 23 marbles and finds 19 more. ..." ->
    "23+19=42."), or None if it is not one (or is cut off)."""
    for pattern, steps in QUESTIONS:
        match = pattern.search(question)
        if match:
            return steps(*map(int, match.groups()))
    return None


BARE_ANSWER = re.compile(r"(?:^|\n)A: (\d+)\.\n")


def bare_answer_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the digits of bare answers ("A: 47." -> the span of "47"): the tokens a thought can
    help with most, since nothing in the text before them works the problem out."""
    return [m.span(1) for m in BARE_ANSWER.finditer(text)]


def filler_token_id(tokenizer) -> int:
    """The filler thought's token: "." (a thought of L of them says nothing; the controls use it)."""
    return tokenizer.encode(".", add_special_tokens=False).ids[0]


def gsm8k_text(row: dict) -> str:
    """A GSM8K row as "Q: ...\\nA: <worked answer>\\n", calculator annotations <<a*b=c>> removed."""
    answer = re.sub(r"<<[^>]*>>", "", row["answer"]).replace("####", "The answer is")
    return f"Q: {row['question']}\nA: {answer}\n"


def document_text(row: dict, where: str) -> str:
    """A data row's document: its "text", or a GSM8K question and answer as one worked problem."""
    if isinstance(row.get("text"), str):
        return row["text"]
    if {"question", "answer"} <= row.keys():
        return gsm8k_text(row)
    raise ValueError(f"{where}: a row needs a 'text' field (or GSM8K's 'question' and 'answer'); it has {sorted(row)}")


def read_jsonl(path: Path):
    """(line number, object) for each non-empty line of a .jsonl file, with a clear error for a bad line."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: a line must be a JSON object, got {type(row).__name__}")
        yield number, row


def read_texts(spec: str, limit: int | None = None) -> list[str]:
    """Documents from `spec`: "arithmetic", a .txt file (blank-line separated), a .jsonl file (a "text"
    field, or GSM8K's question/answer), or a Hub dataset name (needs the `datasets` library)."""
    if spec == "arithmetic":
        return arithmetic_texts(limit or 4000, seed=0)
    path = Path(spec).expanduser()
    if path.suffix == ".txt" and path.exists():
        docs = [d.strip() for d in path.read_text().split("\n\n") if d.strip()]
    elif path.suffix == ".jsonl" and path.exists():
        docs = []
        for number, row in read_jsonl(path):
            docs.append(document_text(row, f"{path}:{number}"))
            if limit and len(docs) >= limit:
                break
    elif path.suffix in (".txt", ".jsonl") or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file {spec!r} does not exist")
    else:
        docs = read_hub_dataset(spec, limit or 2000)
    if not docs:
        raise ValueError(f"--data {spec}: the file holds no documents")
    return docs[:limit] if limit else docs


def read_hub_dataset(name: str, limit: int) -> list[str]:
    """The first `limit` documents of a Hub dataset's train split, streamed (open-web-math in the paper)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{name!r} is not a local .txt/.jsonl file or 'arithmetic'; reading it as a Hub "
                         "dataset needs the `datasets` library: pip install datasets") from None
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
        return [row["text"] for row, _ in zip(stream, range(limit))]
    except Exception as e:
        raise OSError(f"could not read Hub dataset {name!r} ({type(e).__name__}: {e}). Without network, "
                           "pass a local .txt or .jsonl file instead, e.g. --data=../shared/data/c4/...") from None


class TokenWindows:
    """Documents tokenized and packed into one stream (separated by EOS), served as fixed windows.

    batch(step) is a pure function of (seed, step): a resumed run sees exactly the same batches.
    focus(text) -> character spans marks the tokens an evaluation is about (bare answers' digits); `focus` is
    the (n_tokens,) bool array of those tokens."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int, eos_id: int | None, seed: int, focus=None,
                 name: str = "the text"):
        ids, marks = [], []
        for text in texts:
            encoding = tokenizer.encode(text)
            spans = focus(text) if focus else []
            ids.extend(encoding.ids)
            marks.extend(any(s <= start < e for s, e in spans) for start, _ in encoding.offsets)
            if eos_id is not None:
                ids.append(eos_id)
                marks.append(False)
        self.tokens, self.focus = np.array(ids, dtype=np.int64), np.array(marks, dtype=bool)
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{name} has only {len(self.tokens)} tokens; a window needs seq_len + 1 = {seq_len + 1} "
                             "(give more text or a smaller --seq_len)")
        self.seq_len, self.seed = seq_len, seed

    def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """(batch_size, seq_len) windows starting at random token offsets: {"tokens", "focus"}."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=batch_size)
        return {name: np.stack([x[s:s + self.seq_len] for s in starts])
                for name, x in (("tokens", self.tokens), ("focus", self.focus))}

    def windows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first n non-overlapping windows: a fixed evaluation set. -> tokens, focus (n, seq_len)"""
        n = min(n, len(self.tokens) // self.seq_len)
        shape = (n, self.seq_len)
        return self.tokens[:n * self.seq_len].reshape(shape), self.focus[:n * self.seq_len].reshape(shape)

    def focus_windows(self, n: int, after: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Up to n windows, one per run of focus tokens, each placed so that the run starts at index
        seq_len - after: the text before it is context, and every window has its focus at the same index,
        so "the thought at the same position of another window" is a thought for another problem's answer.
        -> tokens, focus (n, seq_len); focus marks the run only."""
        T = self.seq_len
        starts = np.flatnonzero(self.focus & ~np.concatenate([[False], self.focus[:-1]]))
        starts = starts[(starts >= T - after) & (starts + after <= len(self.tokens))][:n]
        tokens = np.stack([self.tokens[s - (T - after):s + after] for s in starts]) if len(starts) else \
            np.zeros((0, T), dtype=np.int64)
        focus = np.zeros_like(tokens, dtype=bool)
        for row, s in enumerate(starts):
            run = self.focus[s:s + after]
            end = np.argmin(run) if not run.all() else after                    # the first non-focus token
            focus[row, T - after:T - after + end] = True
        return tokens, focus


class ProblemWindows:
    """One document per window, from its first token, right-padded with EOS: no problem is cut off, and with
    bare problems every window holds an answer. batch(step) -> {"tokens", "focus", "loss_mask"} (batch_size,
    seq_len): loss_mask is False on the padding after the document's own EOS (which stays a target)."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int, eos_id: int, seed: int, focus=None,
                 name: str = "the text"):
        rows = [TokenWindows([text], tokenizer, 1, eos_id, seed, focus) for text in texts]
        longest = max(len(r.tokens) for r in rows)
        if longest > seq_len:
            raise ValueError(f"{name}: a document has {longest} tokens; --seq_len must hold the longest "
                             f"(at least {longest}) when each window holds one document")
        self.tokens = np.full((len(rows), seq_len), eos_id, dtype=np.int64)
        self.focus = np.zeros((len(rows), seq_len), dtype=bool)
        self.loss_mask = np.zeros((len(rows), seq_len), dtype=bool)
        for n, r in enumerate(rows):
            self.tokens[n, :len(r.tokens)], self.focus[n, :len(r.tokens)] = r.tokens, r.focus
            self.loss_mask[n, :len(r.tokens)] = True
        self.seed = seed

    def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        picks = np.random.default_rng([self.seed, step]).integers(0, len(self.tokens), size=batch_size)
        return {"tokens": self.tokens[picks], "focus": self.focus[picks], "loss_mask": self.loss_mask[picks]}
