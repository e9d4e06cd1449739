"""eval.py and generate.py on a tiny model: scores against values computed by hand from the model's own logits,
zero mixing = no thoughts, generation never emits a marker and equals model.generate without thinking,
the JSON output, and clear errors."""

import json

import pytest
import torch

import eval as qeval
from conftest import tiny_model
from generate import generate_with_thoughts
from model import generate, load_pretrained
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


def by_hand(qs, tokenizer, task, rows, force_weight=None):
    """The official score computed the long way: plain forward logits (no thoughts), or the logits after the
    same sampled thoughts with the mixing weight forced to `force_weight` = 1 (pure post-thought)."""
    symbols = "0123456789" if task == "gsm8k" else "ABCDE"
    allowed = [i for i in range(tokenizer.get_vocab_size())
               if tokenizer.decode([i]).lstrip(" ") in symbols or tokenizer.decode([i]) == "\n"]
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
                logits = qs.thought_logits(tokens, qs.sample_thoughts(tokens))[0]
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
    result = qeval.answer_scores(qs, tokenizer, task, rows, batch_size=2)      # padded batches
    assert result["no_thoughts"]["n"] == 3
    assert result["no_thoughts"]["soft"] == pytest.approx(by_hand(qs, tokenizer, task, rows), rel=1e-4)
    # with the mixing weight forced to 1 the with-thought score is the post-thought prediction alone
    monkeypatch.setattr(qs.mixing_head, "forward", lambda h_base, h: torch.ones_like(h_base[..., :1]))
    torch.manual_seed(0)
    result = qeval.answer_scores(qs, tokenizer, task, rows, batch_size=1)      # same order of sampling
    assert result["thoughts"]["soft"] == pytest.approx(by_hand(qs, tokenizer, task, rows, force_weight=1), rel=1e-4)
    assert result["thoughts"]["soft"] != pytest.approx(result["no_thoughts"]["soft"], rel=1e-3)


def test_zero_mixing_weight_gives_the_no_thought_scores(tiny_qstar, monkeypatch):
    qs, tokenizer = tiny_qstar
    monkeypatch.setattr(qs.mixing_head, "forward", lambda h_base, h: torch.zeros_like(h_base[..., :1]))
    for task, rows in (("gsm8k", GSM8K_ROWS), ("csqa", CSQA_ROWS)):
        result = qeval.answer_scores(qs, tokenizer, task, rows)
        assert result["thoughts"] == result["no_thoughts"]
    windows = torch.randint(0, 1000, (3, 16))
    nll = qeval.nll_with_and_without_thoughts(qs, windows, batch_size=2)
    assert nll["nll_thought"] == nll["nll_base"] and nll["hard_nll_thought"] == nll["hard_nll_base"]


def test_generation_with_thinking_never_emits_a_marker(tiny_qstar):
    qs, tokenizer = tiny_qstar
    vocab = qs.model.config.vocab_size
    for seed in range(3):
        gen = generate_with_thoughts(qs, tokenizer, "Q: 2 + 3 =", max_new_tokens=6, temperature=1.0, seed=seed,
                                     stop_at_eos=False)
        assert len(gen.token_ids) == 6 and all(0 <= t < vocab for t in gen.token_ids)
        assert len(gen.thoughts) == 6 and all(isinstance(t, str) for t in gen.thoughts)
        assert len(gen.mix_weights) == 6 and any(w != 0 for w in gen.mix_weights)
        assert gen.tokens_per_s > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_without_thinking_equals_model_generate(tiny_qstar, temperature):
    qs, tokenizer = tiny_qstar
    ours = generate_with_thoughts(qs, tokenizer, "The capital of", max_new_tokens=8, temperature=temperature,
                                  seed=3, thinking=False, stop_at_eos=False)
    plain = generate(qs.model, tokenizer, "The capital of", max_new_tokens=8, temperature=temperature, seed=3,
                     stop_at_eos=False)
    assert ours.text == plain and ours.thoughts == [""] * 8


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
            logits = model.lm_head(h_base + weight * (h_end - h_base))
            assert logits.argmax().item() == token
            ids.append(token)


def test_eval_cli_writes_json_with_both_sides(tiny_qstar, tmp_path, monkeypatch, capsys):
    qs, tokenizer = tiny_qstar
    monkeypatch.setattr(QuietStar, "from_pretrained", classmethod(lambda cls, path, **kw: (qs, tokenizer)))
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
    assert set(result["no_thoughts"]) == {"nll", "hard_nll"} and "mix_weight" in result["thoughts"]
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
    qs.save_pretrained(tmp_path, tokenizer)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "reward_mean": 0.1}) + "\n")
    assert qeval.main([f"--model={tmp_path}", "--task=thoughts", "--data=arithmetic", "--seq_len=24"]) == 0
    page = (tmp_path / "thoughts.html").read_text()
    assert page.count('class="tok"') == 24 and "<svg" in page
