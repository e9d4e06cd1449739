"""eval.py and generate.py on a tiny model: scores against values computed by hand from the specification,
zero mixing = no thoughts, generation never emits a marker and equals model.generate without thinking,
the JSON output, and clear errors."""

import json
import math

import pytest
import torch
from conftest import FavouriteTokensHead, tiny_model

import eval as qeval
from data import filler_token_id
from machinery import benchmarks
from research import content
from generate import sample_thoughts, thought_logits, token_scores
from generate import generate_with_thoughts
from machinery import hf_io
from machinery.hf_io import load_pretrained, save_quietstar
from qstar import QuietStar, QuietStarConfig

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 12 pens. How many pens are in 2 boxes?", "answer": "2 * 12 = 24\n#### 24"},
    {"question": "Sara had 50 stamps and gave away 8. How many are left?", "answer": "50 - 8 = 42\n#### 42"},
]
CSQA_ROWS = [
    {"question": "Where do you keep milk cold?", "choices": {"label": list("ABCDE"),
     "text": ["oven", "fridge", "shelf", "car", "garden"]}, "answerKey": "B"},
    {"question": "What do you use to write?", "choices": {"label": list("ABCDE"),
     "text": ["pen", "spoon", "shoe", "cup", "lamp"]}, "answerKey": "A"},
    {"question": "What falls from clouds?", "choices": {"label": list("ABCDE"),
     "text": ["sand", "bread", "glass", "rain", "paper"]}, "answerKey": "D"},
]


@pytest.fixture(scope="module")
def tiny_qstar():
    _, tokenizer = load_pretrained("smollm2-135m")
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), window=None, std=0.1)
    qs = QuietStar(model, QuietStarConfig(thought_len=2), tokenizer)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)             # thoughts matter
    return qs.eval(), tokenizer


# The official allowed sets, from the specification (the official compute_metrics: the answer symbols' own tokens
# and the newline, nothing else), written out for SmolLM2's vocabulary: digits are ids 32-41 ("0".."9"), the
# letters are " A" 330, " B" 389, " C" 340, " D" 422, " E" 414, and the newline is 198.
SPEC_ALLOWED = {"gsm8k": list(range(32, 42)) + [198], "csqa": [330, 389, 340, 422, 414, 198]}


def test_allowed_tokens_are_the_answer_symbols_and_the_newline():
    _, tokenizer = load_pretrained("smollm2-135m")
    for task, symbols in (("gsm8k", "0123456789"), ("csqa", "ABCDE")):
        allowed = benchmarks.allowed_token_ids(tokenizer, symbols).tolist()
        assert sorted(allowed) == sorted(SPEC_ALLOWED[task])
        assert sorted(tokenizer.decode([i]).strip() or tokenizer.decode([i]) for i in allowed) == \
            sorted(["\n", *symbols])
        assert 216 not in allowed and 0 not in allowed                  # the lone space, a special token


def test_soft_score_by_hand():
    """Vocabulary of 6, allowed {1, 3, 5}; answer tokens at positions 2, 3, 4 of ids [0, 2, 1, 3, 5]."""
    ln = torch.tensor([2.0, 3.0]).log()
    logits = torch.full((5, 6), 50.0)                                          # disallowed ids: ignored
    logits[1, [1, 3, 5]] = torch.tensor([ln[0], 0, 0])                        # p(1) = 2 / 4
    logits[2, [1, 3, 5]] = torch.tensor([0, ln[1], 0])                        # p(3) = 3 / 5
    logits[3, [1, 3, 5]] = torch.tensor([0, 0, ln[0]])                        # p(5) = 2 / 4
    soft, exact = benchmarks.soft_score(logits, [0, 2, 1, 3, 5], [2, 3, 4], torch.tensor([1, 3, 5]))
    # fp32: three softmaxes over 3 logits and their product, ~20 roundings of 6e-8 at most (1.2e-6); 1e-5 leaves
    # room, and a wrong position or token changes the score by a factor 1.2 and more
    assert soft == pytest.approx(0.5 * 0.6 * 0.5, rel=1e-5) and exact
    logits[3, 1] = 5.0                                                          # now 1 beats the gold 5
    soft, exact = benchmarks.soft_score(logits, [0, 2, 1, 3, 5], [2, 3, 4], torch.tensor([1, 3, 5]))
    assert soft == pytest.approx(0.5 * 0.6 * 2 / (math.exp(5) + 1 + 2), rel=1e-5) and not exact
    assert benchmarks.soft_score(logits, [0, 2, 1, 3, 5], [], torch.tensor([1, 3, 5])) == (0.0, False)


def test_answer_scores_on_uniform_logits_count_the_scored_tokens(tiny_qstar):
    """With every logit equal, each scored token has probability 1 / (allowed set size): the score is
    (1/11)^(digits + newline) for GSM8K ("1,000": the comma is skipped) and (1/6)^2 for CommonsenseQA."""
    qs, tokenizer = tiny_qstar
    weight = qs.model.lm_head.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
    try:
        rows = GSM8K_ROWS + [{"question": "How many grams in a kilogram?", "answer": "#### 1,000"}]
        result = benchmarks.answer_scores(qs, tokenizer, "gsm8k", rows, batch_size=3)
        expected = (11.0 ** -2 + 11.0 ** -3 + 11.0 ** -3 + 11.0 ** -5) / 4         # "7", "24", "42", "1,000"
        # each probability is 1/11 to one fp32 rounding, a product of <= 5 of them is off by <= 10 x 6e-8; a token
        # counted once too often or too rarely changes a term 11-fold
        for side in ("no_thoughts", "thoughts"):
            assert result[side]["soft"] == pytest.approx(expected, rel=1e-5)
        result = benchmarks.answer_scores(qs, tokenizer, "csqa", CSQA_ROWS, batch_size=2)
        assert result["no_thoughts"]["soft"] == pytest.approx(1 / 36, rel=1e-5)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def by_hand(qs, tokenizer, task, rows, force_weight=None):
    """The official score computed the long way from the specification: plain forward logits (no thoughts), or
    the logits after the same sampled thoughts with the mixing weight forced to 1 (pure post-thought); every
    answer token in SPEC_ALLOWED scored from the previous position, renormalised over SPEC_ALLOWED."""
    allowed = SPEC_ALLOWED[task]
    torch.manual_seed(0)
    scores = []
    for row in rows:
        if task == "gsm8k":
            prompt, answer = f"Q: {row['question']}\nA:", " " + row["answer"].split("#### ")[1] + "\n"
        else:
            lines = "\n".join(f"({l}) {t}" for l, t in zip(row["choices"]["label"], row["choices"]["text"]))
            prompt, answer = f"Q: {row['question']}\n{lines}\nA:", f" {row['answerKey']}\n"
        n_prompt = len(tokenizer.encode(prompt).ids)
        ids = tokenizer.encode(prompt + answer).ids
        tokens = torch.tensor([ids])
        with torch.no_grad():
            if force_weight is None:
                logits = qs.model(tokens)[0]
            else:
                logits = thought_logits(qs, tokens, sample_thoughts(qs, tokens))[0]
        product = 1.0
        for j in range(n_prompt, len(ids)):
            if ids[j] in allowed:
                probs = logits[j - 1, allowed].softmax(-1)
                product *= probs[allowed.index(ids[j])].item()
        scores.append(product)
    return sum(scores) / len(scores)


@pytest.mark.parametrize("task,rows", [("gsm8k", GSM8K_ROWS), ("csqa", CSQA_ROWS)])
def test_answer_scores_equal_hand_computed_values(tiny_qstar, task, rows, monkeypatch):
    qs, tokenizer = tiny_qstar
    torch.manual_seed(0)
    result = benchmarks.answer_scores(qs, tokenizer, task, rows, batch_size=2)      # padded batches
    assert result["no_thoughts"]["n"] == 3
    # padded batches against one text at a time: fp32 logits ~1 differ by ~1e-7, each probability by as much
    # relative, a product of <= 5 of them by < 1e-6 (measured 4e-8); 1e-4 still resolves 1/40 of the thoughts' effect
    assert result["no_thoughts"]["soft"] == pytest.approx(by_hand(qs, tokenizer, task, rows), rel=1e-4)
    # with the mixing weight forced to 1 the with-thought score is the post-thought prediction alone
    monkeypatch.setattr(qs.mixing_head, "forward", lambda h_base, h: torch.ones_like(h_base[..., :1]))
    torch.manual_seed(0)
    result = benchmarks.answer_scores(qs, tokenizer, task, rows, batch_size=1)      # same order of sampling, and the
    # same computation (one text a batch), so the same thoughts; h_base + 1 * (h_end - h_base) rounds like h_end
    assert result["thoughts"]["soft"] == pytest.approx(by_hand(qs, tokenizer, task, rows, force_weight=1), rel=1e-4)
    assert result["thoughts"]["soft"] != pytest.approx(result["no_thoughts"]["soft"], rel=1e-3)   # 4% and 14%


def test_zero_mixing_weight_gives_the_no_thought_scores(tiny_qstar, monkeypatch):
    qs, tokenizer = tiny_qstar
    monkeypatch.setattr(qs.mixing_head, "forward", lambda h_base, h: torch.zeros_like(h_base[..., :1]))
    for task, rows in (("gsm8k", GSM8K_ROWS), ("csqa", CSQA_ROWS)):
        result = benchmarks.answer_scores(qs, tokenizer, task, rows)
        assert result["thoughts"] == result["no_thoughts"]
    windows = torch.randint(0, 1000, (3, 16))
    scores = qeval.score_thoughts(qs, windows, filler_id=13, batch_size=2, oracle=torch.randint(0, 1000, (3, 16, qs.config.thought_len)))
    for p in qeval.PREDICTORS:
        assert torch.equal(scores[p], scores["none"])


# ---- the controls: filler and shuffled thoughts, paired intervals, hard tokens -------------------------------

def test_controls_are_the_filler_and_another_windows_thought(tiny_qstar):
    qs, tokenizer = tiny_qstar
    windows = torch.randint(0, 1000, (3, 10))
    torch.manual_seed(5)
    scores = qeval.score_thoughts(qs, windows, filler_id=13, batch_size=2)
    torch.manual_seed(5)                                  # the same samples: one batch of 2, then one of 1
    sampled = torch.cat([token_scores(qs, windows[:2])["thought_ids"], token_scores(qs, windows[2:])["thought_ids"]])
    filler = torch.full_like(sampled, 13)
    # batches of 2 and 1 against one of 3, fp32 NLLs ~11: a log-sum-exp of 49152 logits in another order is off by
    # ~20 roundings (1e-6; measured 0): 1e-5, no relative part. Other thoughts move them by 3e-4 here (the last one).
    assert torch.allclose(scores["filler"], token_scores(qs, windows, filler)["nll_mixed"], atol=1e-5, rtol=0)
    donors = sampled[[1, 2, 0]]                           # window n gets window n+1's thoughts
    assert torch.allclose(scores["shuffled"], token_scores(qs, windows, donors)["nll_mixed"], atol=1e-5, rtol=0)
    assert torch.allclose(scores["sampled"], token_scores(qs, windows, sampled)["nll_mixed"], atol=1e-5, rtol=0)
    assert not torch.allclose(scores["sampled"], scores["filler"], atol=1e-5, rtol=0)
    single = qeval.donor_thoughts(sampled[:1])           # one window: the thought half a window away
    assert torch.equal(single[0, 5], sampled[0, 0]) and torch.equal(single[0, 0], sampled[0, 5])


def test_paired_difference_by_hand():
    """Three windows: differences (1, 1), (4) and no token. Token-weighted mean (1 + 1 + 4) / 3 = 2; resampling
    windows, the 2.5% / 97.5% quantiles are 1 (window 0 alone, probability 1/4) and 4 (window 1 alone)."""
    a = torch.tensor([[1.0, 1.0, 9.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    mean, low, high = qeval.paired_difference(a, torch.zeros_like(a), mask, n_boot=4000)
    # exact: each tail holds 7/27 of the resamples (window 0 or 1 alone, with or without the empty window 2), far
    # above 2.5% (1037 +- 28 of 4000); approx's default 1e-6 covers the fp64 division
    assert (mean, low, high) == (pytest.approx(2.0), pytest.approx(1.0), pytest.approx(4.0))
    assert all(math.isnan(x) for x in qeval.paired_difference(a, a, torch.zeros_like(mask)))


def test_hard_tokens_do_not_flatter_a_thought_that_is_pure_noise():
    """Every predictor is the same true difficulty plus its own independent noise: no thought helps. Chosen by the
    mean of the predictors, the hardest 10% show no difference; chosen by the no-thought NLL, as the paper's
    "difficult tokens" are, the same data would show a large false gain (the test has the power to fail)."""
    g = torch.Generator().manual_seed(0)
    difficulty = torch.rand(200, 64, generator=g) ** 3 * 8                        # many easy, a few hard tokens
    nll = {p: (difficulty + torch.randn(200, 64, generator=g)).clamp(min=0) for p in qeval.PREDICTORS}
    comparison = qeval.compare_thoughts(nll, n_boot=1000)
    # Fixed data and bootstrap seeds (the same numbers on any CPU, to the last bits): each interval holds 0 with
    # >= 0.06 to spare, 1.5 bootstrap SEs (on fresh seeds one of the three 95% intervals missed 0 in 5 of 20).
    for low_high in comparison["hard"]["diff"].values():
        assert low_high[1] < 0 < low_high[2]
    everything = torch.ones(200, 64, dtype=torch.bool)
    by_base = everything & (nll["none"] >= nll["none"].quantile(0.9))
    mean, _, high = qeval.paired_difference(nll["sampled"], nll["none"], by_base)
    assert high < -0.3                     # -0.40 here (SE 0.04), -0.36 to -0.50 on 20 other seeds


def test_generated_thoughts_never_contain_eos_or_special_tokens(tiny_qstar):
    """An LM head that favours EOS and a special token by +30: the text may emit them (stop_at_eos=False), the
    thoughts never do, and every step still records its thought and mixing weight."""
    qs, tokenizer = tiny_qstar
    banned = qs.banned_thought_ids.tolist()
    assert 2 in banned and 0 in banned                                  # SmolLM2's <|im_end|>, <|endoftext|>
    head = qs.model.lm_head
    qs.model.lm_head = FavouriteTokensHead(qs.model.config.dim, qs.model.config.vocab_size, [0, 2])
    try:
        for seed in range(3):
            gen = generate_with_thoughts(qs, tokenizer, "Q: 2 + 3 =", max_new_tokens=6, temperature=1.0, seed=seed,
                                         stop_at_eos=False)
            assert len(gen.token_ids) == len(gen.thought_ids) == len(gen.mix_weights) == 6
            assert all(len(t) == qs.config.thought_len and not set(t) & set(banned) for t in gen.thought_ids)
            assert set(gen.token_ids) <= {0, 2}                          # the text itself is not restricted
            assert gen.tokens_per_s > 0
    finally:
        qs.model.lm_head = head


# The argmax up to rounding: a cached and a naive forward order their fp32 sums differently (logits <= 0.22 here,
# off by ~1e-7), so an exact argmax could flip at a near-tie; the runner-up is 6e-5 and more below in these steps.
ARGMAX_ROUNDING = 1e-6


def test_generation_with_thinking_equals_a_naive_recomputation(tiny_qstar):
    """Each token's mixed prediction, recomputed from scratch with the same thought (no KV cache at all)."""
    qs, tokenizer = tiny_qstar
    gen = generate_with_thoughts(qs, tokenizer, "Q: 2 + 3 =", max_new_tokens=4, seed=1, stop_at_eos=False)
    ids = tokenizer.encode("Q: 2 + 3 =").ids
    start, end = qs.marker_embeddings()
    model = qs.model
    with torch.no_grad():
        for token, thought_ids in zip(gen.token_ids, gen.thought_ids):
            assert len(thought_ids) == qs.config.thought_len
            embeds = torch.cat([model.embed(torch.tensor(ids)), start[None], model.embed(torch.tensor(thought_ids)),
                                end[None]])[None]
            h_end = model.hidden(embeds, torch.arange(embeds.shape[1]))[:, -1:]
            h_base = model.hidden(model.embed(torch.tensor([ids])))[:, -1:]
            weight = qs.mixing_head(h_base, h_end)
            logits = model.lm_head(h_base + weight * (h_end - h_base))[0, 0]
            assert logits[token] >= logits.max() - ARGMAX_ROUNDING
            ids.append(token)


def test_plain_generation_equals_greedy_full_forwards(tiny_qstar):
    """thinking=False is plain greedy decoding: each token the argmax of a full forward over the text so far,
    recomputed without a cache, and no thoughts recorded."""
    qs, tokenizer = tiny_qstar
    gen = generate_with_thoughts(qs, tokenizer, "Q: 2 + 3 =", max_new_tokens=5, thinking=False, stop_at_eos=False)
    assert len(gen.token_ids) == 5 and not any(gen.thought_ids)
    ids = tokenizer.encode("Q: 2 + 3 =").ids
    with torch.no_grad():
        for token in gen.token_ids:
            logits = qs.model(torch.tensor([ids]))[0, -1]
            assert logits[token] >= logits.max() - ARGMAX_ROUNDING
            ids.append(token)


def test_eval_cli_writes_json_with_both_sides(tiny_qstar, tmp_path, monkeypatch, capsys):
    qs, tokenizer = tiny_qstar
    monkeypatch.setattr(hf_io, "load_quietstar", lambda path, **kw: (qs, tokenizer))
    monkeypatch.setattr(hf_io.fast, "use", lambda qs: qs)         # keep the shared fixture on its plain path
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    out = tmp_path / "result.json"
    assert qeval.main(["--task=gsm8k", f"--data={data}", "--limit=2", f"--out={out}"]) == 0
    result = json.loads(out.read_text())
    assert {"task", "model", "data", "limit", "n", "thought_len", "seed", "seconds", "thoughts", "no_thoughts"} <= result.keys()
    assert result["n"] == 2 and set(result["thoughts"]) == set(result["no_thoughts"]) == {"soft", "exact", "n"}
    assert "no_thoughts" in capsys.readouterr().out
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "one two three four five six seven eight nine ten " * 8}) + "\n")
    assert qeval.main(["--task=nll", f"--data={text}", f"--out={out}", "--seq_len=16"]) == 0
    result = json.loads(out.read_text())
    assert set(result["text"]["all"]["nll"]) == set(qeval.PREDICTORS) - {"oracle"} and "focus" not in result["text"]
    assert set(result["text_post"]["all"]["nll"]) == set(qeval.PREDICTORS) - {"oracle"}
    assert set(result["text"]["hard"]["diff"]) == {"sampled-none", "sampled-filler", "sampled-shuffled"}
    assert qeval.main(["--task=nll", "--data=arithmetic", "--limit=12", f"--out={out}", "--seq_len=32"]) == 0
    result = json.loads(out.read_text())
    assert result["text"]["focus"]["n_windows"] >= 1 and "sampled-shuffled" in result["text"]["focus"]["diff"]
    assert content.main(["--limit=12", f"--out={out}", "--seq_len=32"]) == 0           # the answers' instruments
    result = json.loads(out.read_text())
    for kind in ("mixed", "post"):
        assert result[kind]["focus"]["n_windows"] >= 3 and "oracle-none" in result[kind]["focus"]["diff"]
    assert set(result["content_reward"]) == {"mixed", "post", "mixed_filler", "post_filler"}
    assert qeval.main(["--task=gsm8k_gen", f"--data={data}", "--limit=1", "--max_new_tokens=3", f"--out={out}"]) == 0
    result = json.loads(out.read_text())
    assert {"exact", "n", "tokens_per_s", "examples"} == set(result["thoughts"]) == set(result["no_thoughts"])


def test_bad_paths_and_unknown_tasks_give_clear_errors(tmp_path, capsys):
    assert qeval.main(["--task=gsm8k", "--data=no/such/file.jsonl"]) == 2
    assert "is not a file" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "hello"}) + "\n")
    assert qeval.main(["--task=csqa", f"--data={wrong}"]) == 2
    assert "does not look like csqa data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qeval.main(["--task=mmlu", "--data=x.jsonl"])
    assert "invalid choice: 'mmlu'" in capsys.readouterr().err


def test_thoughts_page_command_on_a_checkpoint(tiny_qstar, tmp_path):
    qs, tokenizer = tiny_qstar
    save_quietstar(qs, tmp_path, tokenizer)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "reward_mean": 0.1}) + "\n")
    assert qeval.main([f"--model={tmp_path}", "--task=thoughts", "--data=arithmetic", "--seq_len=24"]) == 0
    page = (tmp_path / "thoughts.html").read_text()
    assert page.count('class="tok"') == 24 and "<svg" in page


def test_worked_steps_read_back_every_kind_of_problem():
    """The generator's own worked twin (same random numbers, bare=False) is the expected value."""
    import random

    from data import KINDS, arithmetic_problem, worked_steps
    for kind in KINDS:
        for seed in range(50):
            bare = arithmetic_problem(random.Random(seed), bare=True, kinds=(kind,))
            worked = arithmetic_problem(random.Random(seed), bare=False, kinds=(kind,))
            assert worked_steps(bare) == worked.split("\nA: ")[1].split(" The answer")[0], (kind, bare)
    assert worked_steps("Q: What is the capital of France?\nA:") is None


def test_oracle_thought_is_the_last_worked_step_before_each_answer_digit():
    _, tokenizer = load_pretrained("smollm2-135m")
    text = ("Q: Ben has 46 books, buys 4 bags with 8 books each, then gives away 22. How many books does Ben have "
            "now?\nA: 56.\n")
    ids = tokenizer.encode(text).ids
    enc = tokenizer.encode(text)
    digits = [j for j, (a, b) in enumerate(enc.offsets) if text[a:b].strip() in ("5", "6", "56") and a > len(text) - 8]
    windows = torch.tensor([ids])
    focus = torch.zeros(1, len(ids) - 1, dtype=torch.bool)
    focus[0, [d - 1 for d in digits]] = True                    # position i predicts the digit x_{i+1}
    filler = filler_token_id(tokenizer)
    step = tokenizer.encode("78-22=56.", add_special_tokens=False).ids   # 46 + 4*8 = 78, 78 - 22 = 56: by hand
    oracle, found = content.oracle_thoughts(tokenizer, windows, focus, len(step) + 2, filler)
    assert found.tolist() == [True]
    for i in range(len(ids)):
        expected = [filler, filler] + step if i < len(ids) - 1 and focus[0, i] else [filler] * (len(step) + 2)
        assert oracle[0, i].tolist() == expected, i
    at_end, _ = content.oracle_thoughts(tokenizer, windows, focus, len(step) + 2, filler, padding="end")
    assert at_end[0, digits[0] - 1].tolist() == step + [filler, filler]       # the step first, the filler after it
    short, _ = content.oracle_thoughts(tokenizer, windows, focus, 3, filler)   # too long: its last tokens, the answer
    assert short[0, digits[0] - 1].tolist() == step[-3:]
    cut, found = content.oracle_thoughts(tokenizer, windows[:, -6:], focus[:, -5:], 4, filler)   # question cut off
    assert found.tolist() == [False] and (cut == filler).all()


def test_held_out_thoughts_at_a_temperature_near_zero_are_the_greedy_ones(tiny_qstar, tmp_path, monkeypatch, capsys):
    """--thought_temperature replaces the checkpoint's for the evaluation: near 0 every thought token is the arg
    max, so two different sampling seeds write the same thoughts (at temperature 1 they differ)."""
    _, tokenizer = tiny_qstar
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), window=None, std=0.1)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)          # logit gaps ~0.1 (not ~1e-4): 0.001 makes the arg max certain
    qs = QuietStar(model, QuietStarConfig(thought_len=2), tokenizer).eval()
    monkeypatch.setattr(hf_io, "load_quietstar", lambda path, **kw: (qs, tokenizer))
    monkeypatch.setattr(hf_io.fast, "use", lambda qs: qs)
    texts = content.arithmetic_texts(12, seed=3, bare_fraction=1.0)

    def thoughts(seed):
        torch.manual_seed(seed)
        return content.heldout_answers(qs.eval(), tokenizer, texts, 32, reward_windows=1)["answer_thoughts"]["thoughts"]
    assert thoughts(0) != thoughts(1)
    out = tmp_path / "result.json"
    assert content.main(["--limit=12", f"--out={out}", "--seq_len=32", "--thought_temperature=0.001"]) == 0
    assert json.loads(out.read_text())["thought_temperature"] == 0.001 and qs.config.thought_temperature == 0.001
    assert thoughts(0) == thoughts(1)
    assert content.main(["--limit=12", "--thought_temperature=0"]) == 2
    assert "--thought_temperature must be positive" in capsys.readouterr().err
