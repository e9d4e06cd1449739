"""research/levers.py: thinking at chosen positions (entropy:Q, random:Q, answers), groups of thoughts and their
baselines, the two reward sources, the bounded mixing weight and the warm start's forced thoughts. Thinking at a
subset of positions must equal thinking at every position restricted to that subset: the streams never see each
other, so the same thoughts give the same log-probs, rewards and gradients."""

import copy
import math

import pytest
import torch
from conftest import tiny_model, word_tokenizer

import fast
import generate
import train
from qstar import MixingHead, QuietStar, QuietStarConfig, at_streams
from research import content, levers
from research.levers import (BoundedMixingHead, LeverConfig, Levers, answer_positions, lever_advantages,
                             reward_sources, select_positions)

V, B, T, L, M = 37, 2, 11, 3, 2
AT = torch.tensor([[0, 4, 7, 9], [2, 3, 8, 10]])      # (B, K=4), unequal gaps; 10 = T-1 has no next token


def make_qstar(window, fast_paths, **overrides) -> QuietStar:
    cfg = LeverConfig(**dict(thought_len=L, n_true=3, n_thoughts=M, post_nll_weight=0.5) | overrides)
    qs = Levers(tiny_model(V, window=window), cfg, word_tokenizer(V - 1)).double()
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.1)       # a trained-looking head: every path live
    return fast.use(qs, fast_paths)


def rollout(qs, tokens, thought_ids, at):
    """Steps 1-3 with given thoughts -> the thoughts' log-probs (B*M, K) and talk's outputs (B*M, N, K)."""
    h_base, cache = qs.base_pass(tokens)
    _, thought_logp = qs.think(tokens, cache, qs.config.n_thoughts, thought_ids, at)
    return {"thought_logp": thought_logp, **qs.talk(tokens, h_base, cache, qs.config.n_thoughts)}


def per_stream_and_grads(qs, tokens, thought_ids, at):
    qs.zero_grad()
    out = rollout(qs, tokens, thought_ids, at)
    sum(v.sum() for v in out.values()).backward()
    return out, {n: p.grad.clone() for n, p in qs.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast", "dense"])
@pytest.mark.parametrize("window", [None, 4, 7], ids=["no-window", "window4", "window7"])
def test_thinking_at_a_subset_equals_thinking_everywhere_restricted(fast_paths, window):
    qs = make_qstar(window, fast_paths)
    tokens = torch.randint(0, V, (B, T))
    ids = torch.randint(0, V, (B * M, T, L))                              # the same thoughts for both
    at_rows = AT.repeat_interleave(M, dim=0)                              # (B*M, K)
    sub_ids = ids.gather(1, at_rows[..., None].expand(-1, -1, L))
    full, _ = per_stream_and_grads(qs, tokens, ids, None)
    sub, sub_grads = per_stream_and_grads(qs, tokens, sub_ids, AT)
    # fp64: the same sums in another order (< 1e-13 here); a stream that saw another's thought moves them by ~0.1
    for name in full:
        assert torch.allclose(sub[name], at_streams(full[name], at_rows), atol=1e-12, rtol=0), name
    assert (sub["logp_mixed"][-1, :, -1] == 0).all()                            # position T-1: nothing to predict
    # the gradient of the subset's outputs, summed, equals that of the same entries of the full run
    qs.zero_grad()
    full = rollout(qs, tokens, ids, None)
    sum(at_streams(v, at_rows).sum() for v in full.values()).backward()
    for name, p in qs.named_parameters():
        if p.grad is not None:
            assert torch.allclose(sub_grads[name], p.grad, atol=1e-11, rtol=0), name


@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast", "dense"])
def test_training_at_a_subset_gives_the_rewards_of_those_positions(fast_paths, monkeypatch):
    """forward with think_at entropy:Q: the rewards REINFORCE sees at the selected positions are the full run's."""
    qs = make_qstar(5, fast_paths)
    tokens = torch.randint(0, V, (B, T))
    ids = torch.randint(0, V, (B * M, T, L))
    seen = {}
    monkeypatch.setattr(levers, "reinforce_loss", lambda advantage, *a: seen.setdefault("reward", []).append(advantage)
                        or advantage.sum() * 0)
    monkeypatch.setattr(levers, "select_positions", lambda logits, ok, fraction, by: seen.setdefault("by", by) and AT)

    def think(tokens, cache, n_thoughts, thought_ids=None, at=None):
        given = ids if at is None else ids.gather(1, at.repeat_interleave(M, 0)[..., None].expand(-1, -1, L))
        return QuietStar.think(qs, tokens, cache, n_thoughts, given, at)
    monkeypatch.setattr(qs, "think", think)
    for reward_from, rule in (("mixed", "entropy"), ("post", "random")):
        seen.clear()
        qs.config.reward_from, qs.config.think_at = reward_from, "all"
        qs(tokens)
        qs.config.think_at = f"{rule}:0.4"
        qs(tokens)
        full, sub = seen["reward"]                                         # advantages (B, M, T) and (B, M, K)
        assert seen["by"] == rule
        assert torch.allclose(sub, at_streams(full, AT), atol=1e-12, rtol=0), reward_from
        assert (sub[1, :, -1] == 0).all() and sub.abs().sum() > 0


def test_entropy_selection_by_hand():
    """V = 4. Entropies: uniform over 4 = log 4, nearly one-hot ~ 0, uniform over 2 = log 2, over 3 = log 3."""
    inf = float("inf")
    logits = torch.tensor([[[0.0, 0, 0, 0], [50, 0, 0, 0], [0, 0, -inf, -inf], [0, 0, 0, -inf]]])  # (1, T-1=4, V)
    ok = torch.ones(1, 4, dtype=torch.bool)
    assert select_positions(logits, ok, 0.5).tolist() == [[0, 3]]        # ceil(0.5 * 4) = 2: log 4, log 3
    assert select_positions(logits, ok, 0.1).tolist() == [[0]]           # ceil(0.4) = 1
    assert select_positions(logits, ok, 0.75).tolist() == [[0, 2, 3]]
    assert select_positions(logits, ok, 1.0).tolist() == [[0, 1, 2, 3]]
    ok[0, 0] = False                                                      # no target there (padding)
    assert select_positions(logits, ok, 0.5).tolist() == [[2, 3]]
    two = torch.stack([logits[0], logits[0].flip(0)])                     # each window chooses its own positions
    assert select_positions(two, torch.ones(2, 4, dtype=torch.bool), 0.25).tolist() == [[0], [3]]


def test_random_selection_is_uniform_over_positions_with_a_target():
    """The control for entropy:Q: the same count, ceil(Q * (T-1)), drawn uniformly among positions with a target,
    whatever the logits say. 3 of the 5 positions with a target (1 has none): each is chosen with probability 3/5."""
    logits = torch.zeros(1, 6, 4)
    logits[0, 2, 0] = 50.0                                                # a sure position: entropy would skip it
    ok = torch.tensor([[True, False, True, True, True, True]])
    torch.manual_seed(0)
    picks = torch.stack([select_positions(logits, ok, 0.5, by="random")[0] for _ in range(4000)])   # (4000, 3)
    assert (picks[:, 1:] > picks[:, :-1]).all()                           # distinct and ascending
    counts = torch.bincount(picks.flatten(), minlength=6) / 4000
    assert counts[1] == 0
    # 3/5 = 0.6; the binomial std of one frequency over 4000 draws is sqrt(0.6 * 0.4 / 4000) = 0.0077: 5 sigma
    assert ((counts[[0, 2, 3, 4, 5]] - 0.6).abs() < 0.039).all(), counts


def test_think_at_is_parsed_and_checked():
    assert LeverConfig().think_fraction is None and LeverConfig(think_at="answers").think_fraction is None
    assert LeverConfig(think_at="entropy:0.1").think_fraction == 0.1
    assert LeverConfig(think_at="random:0.25").think_fraction == 0.25
    assert LeverConfig(think_at="answers+random:0.1").think_rule == "answers+random"
    assert LeverConfig(think_at="digits+random:0.03").think_fraction == 0.03
    for bad in ("entropy", "entropy:0", "entropy:1.5", "uniform:0.1", "random:2", "entropy:x", "answers:0.1",
                "digits:0.1", "digits+random"):
        with pytest.raises(ValueError, match="--think_at must be all, entropy:Q, random:Q, answers, digits, answers"):
            LeverConfig(think_at=bad)
    with pytest.raises(ValueError, match="--reward_from must be mixed or post"):
        LeverConfig(reward_from="mix")
    with pytest.raises(ValueError, match="its old name 'thought' is now 'post'"):
        LeverConfig(reward_from="thought")
    with pytest.raises(ValueError, match="--thought_nll_weight is now --post_nll_weight"):
        train.parse_args(["--thought_nll_weight=0.5"])
    assert levers.renamed_settings({"thought_nll_weight": 0.5, "reward_from": "thought"}, old_run=True) == {
        "post_nll_weight": 0.5, "reward_from": "post"}                   # a saved run's settings still read


def test_group_advantages_by_hand():
    reward = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 4, 1)            # (B=1, M=4, K=1)
    assert lever_advantages(reward, "mean", False, False).flatten().tolist() == [-2.0, -1.0, 0.0, 3.0]  # mean 3
    std = math.sqrt((4 + 1 + 0 + 9) / 3)                                   # sample std of 1, 2, 3, 6: 2.1602
    expected = [-2 / std, -1 / std, 0.0, 3 / std]
    got = lever_advantages(reward, "mean", True, False).flatten().tolist()
    assert got == pytest.approx(expected, rel=1e-4)                        # the +1e-4 in the denominator: 5e-5
    assert lever_advantages(reward, "mean", True, True).flatten().tolist() == pytest.approx(
        [0, 0, 0, 3 / std], rel=1e-4)
    same = torch.full((1, 16, 3), 0.7)                                     # M = 16, all equal: nothing to learn
    assert lever_advantages(same, "mean", True, False).abs().max() == 0
    # leave-one-out: each minus the mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3
    assert lever_advantages(reward, "loo", False, False).flatten().tolist() == pytest.approx([-8 / 3, -4 / 3, 0, 4])
    assert lever_advantages(reward, "loo", False, True).flatten().tolist() == pytest.approx([0, 0, 0, 4])


def test_forced_thoughts_are_neither_judged_nor_part_of_a_baseline():
    """Rewards 1, 2, 4, 8 at one position, the third thought forced: the own ones are 1, 2, 8 (mean 11/3)."""
    reward, own = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 4, 1), torch.tensor([True, True, False, True]).view(1, 4, 1)
    assert lever_advantages(reward, "mean", False, False, own).flatten().tolist() == pytest.approx(
        [1 - 11 / 3, 2 - 11 / 3, 0, 8 - 11 / 3])
    # leave-one-out among the own: 1 - (2 + 8) / 2, 2 - (1 + 8) / 2, 8 - (1 + 2) / 2
    assert lever_advantages(reward, "loo", False, False, own).flatten().tolist() == pytest.approx([-4, -2.5, 0, 6.5])
    std = math.sqrt(((1 - 11 / 3) ** 2 + (2 - 11 / 3) ** 2 + (8 - 11 / 3) ** 2) / 2)      # sample std of 1, 2, 8
    assert lever_advantages(reward, "mean", True, False, own).flatten().tolist() == pytest.approx(
        [(1 - 11 / 3) / std, (2 - 11 / 3) / std, 0, (8 - 11 / 3) / std], rel=1e-4)
    one_own = torch.tensor([False, True, False, False]).view(1, 4, 1)   # one own sample: nothing to compare with
    assert lever_advantages(reward, "loo", True, False, one_own).abs().max() == 0
    everyone = torch.ones_like(own)
    assert torch.equal(lever_advantages(reward, "loo", True, False, everyone),
                       lever_advantages(reward, "loo", True, False))


def test_reward_sources_by_hand():
    """M = 2, two positions. Mixed rewards (0.1, 0.3) and (0.2, 0.2); post-thought ones (1.0, -1.0), (0.5, 2.0)."""
    rewards = {"mixed": torch.tensor([[0.1, 0.2], [0.3, 0.2]]),          # (B*M = 2, K = 2): thought 0, thought 1
               "post": torch.tensor([[1.0, 0.5], [-1.0, 2.0]])}
    out = reward_sources(rewards, torch.ones(1, 2, dtype=torch.bool), 2)
    assert out["reward_gap_mixed"].item() == pytest.approx((0.2 + 0.0) / 2)
    assert out["reward_gap_post"].item() == pytest.approx((2.0 + 1.5) / 2)
    # position 0: mixed says thought 1 is better, post-thought says thought 0; position 1: a tie against thought 1
    assert out["reward_agreement"].item() == 0.0
    assert reward_sources(rewards, torch.ones(2, 2, dtype=torch.bool), 1) == {}


def test_bounded_mixing_weight_starts_at_one_percent_and_stays_in_0_1():
    head = BoundedMixingHead(6, 5)
    h = torch.randn(3, 6)
    assert torch.allclose(head(h, h), torch.full((3, 1), 0.01), atol=1e-5)   # sigmoid(-4.595) = 0.010001
    torch.nn.init.normal_(head.net[-1].weight, std=100.0)
    w = head(100 * torch.randn(50, 6), 100 * torch.randn(50, 6))
    assert (w >= 0).all() and (w <= 1).all() and w.min() < 0.01 < 0.99 < w.max()
    assert (MixingHead(6, 5)(h, h) == 0).all()                           # the official head starts at exactly 0
    floored = BoundedMixingHead(6, 5, floor=0.05)                        # 0.05 + 0.95 * 0.01 = 0.0595 at the start
    assert torch.allclose(floored(h, h), torch.full((3, 1), 0.0595), atol=1e-5)
    torch.nn.init.constant_(floored.net[-1].weight, -1e4)                 # z -> -inf: the floor, not 0
    assert torch.allclose(floored(h.abs() + 1, h.abs() + 1), torch.full((3, 1), 0.05))


def test_the_post_thought_nll_term_trains_the_post_thought_path():
    """post_nll_weight > 0 adds its NLL to the loss; the loss moves by exactly weight * nll_post."""
    tokens = torch.randint(0, V, (B, T))
    outs = {}
    for weight in (0.0, 0.5):
        qs = make_qstar(5, True, post_nll_weight=weight)
        torch.manual_seed(3)
        outs[weight] = qs(tokens)
    assert outs[0.0]["nll_post"].item() == pytest.approx(outs[0.5]["nll_post"].item(), abs=1e-12)
    assert (outs[0.5]["loss"] - outs[0.0]["loss"]).item() == pytest.approx(0.5 * outs[0.5]["nll_post"].item(),
                                                                           abs=1e-12)


@pytest.mark.parametrize("M_", [1, 16])
def test_groups_of_one_to_sixteen_thoughts_at_selected_positions(M_):
    qs = make_qstar(5, True, n_thoughts=M_, think_at="entropy:0.3", group_std=True)
    out = qs(torch.randint(0, V, (B, T)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and qs.markers.stored.grad.abs().max() > 0
    assert ("reward_agreement" in out) == (M_ >= 2)


def test_subset_on_the_real_model():
    """SmolLM2-135M in fp64: streams at 3 of the positions equal the same streams of the full run (~1e-13)."""
    from machinery.hf_io import load_pretrained
    model, tok = load_pretrained("smollm2-135m", dtype=torch.float64)
    qs = fast.use(QuietStar(model, QuietStarConfig(thought_len=3, n_true=2, n_thoughts=1), tok))
    tokens = torch.tensor([tok.encode("Q: Tom has 3 apples and buys 4 more. How many?\nA: 7.").ids])
    ids = torch.tensor([tok.encode(" 3+4=").ids[:3]]).expand(tokens.shape[1], -1)[None]     # (1, T, 3)
    at = torch.tensor([[2, 9, tokens.shape[1] - 3]])
    with torch.no_grad():
        full = rollout(qs, tokens, ids, None)
        sub = rollout(qs, tokens, ids.gather(1, at[..., None].expand(-1, -1, 3)), at)
    for name in full:   # fp64 rounding through 30 layers ~1e-13; a wrong mask moves log-probs by O(1)
        assert torch.allclose(sub[name], at_streams(full[name], at), atol=1e-9, rtol=0), name


def test_scoring_only_the_answer_positions_equals_scoring_all():
    """content.score_focus thinks at the focus positions alone; there it equals token_scores with the same thoughts
    (sampled, another window's, filler, oracle). Outputs are rounded to fp32 from this fp64 model: 4 x 6e-8."""
    import eval as qeval
    qs = make_qstar(5, True, n_thoughts=1)
    W = 5
    windows, oracle = torch.randint(0, V, (W, T)), torch.randint(0, V, (W, T, L))
    focus = torch.zeros(W, T - 1, dtype=torch.bool)
    focus[:, 6], focus[:3, 7], focus[4] = True, True, False               # 1 or 2 answer digits; none in one
    got = content.score_focus(qs, windows, focus, 5, batch_size=2, oracle=oracle)
    for name, thoughts in (("sampled", got["thought_ids"]), ("shuffled", got["donor_ids"]), ("oracle", oracle),
                           ("filler", torch.full_like(oracle, 5))):
        full = generate.token_scores(qs, windows, thoughts)
        assert torch.allclose(full["nll_mixed"][focus].float(), got[name][focus], atol=1e-6, rtol=0), name
        assert torch.allclose(full["nll_post"][focus].float(), got[f"post_{name}"][focus], atol=1e-6, rtol=0), name
    assert torch.allclose(generate.token_scores(qs, windows)["nll_base"][focus].float(), got["none"][focus], atol=1e-6)
    assert (got["sampled"][~focus] == 0).all()
    # the shuffled thought at an answer is the next window's thought at its answer
    assert torch.equal(got["donor_ids"][0, 6], got["thought_ids"][1, 6])
    compared = qeval.compare_thoughts(got, focus, focus_only=True)       # nothing else was scored
    assert set(compared) == {"focus", "mix_weight"} and "oracle-none" in compared["focus"]["diff"]
    assert compared["focus"]["n_tokens"] == 7


def test_answers_selected_counts_answers_whose_first_digit_is_chosen(monkeypatch):
    qs = make_qstar(5, True, think_at="entropy:0.2")
    focus = torch.zeros(2, T - 1, dtype=torch.bool)
    focus[0, [3, 4]], focus[1, 5] = True, True                            # first digits predicted at 3 and 5
    monkeypatch.setattr(content, "select_positions", lambda logits, ok, q, by: torch.tensor([[3, 7], [1, 2]]))
    assert content.answers_selected(qs, torch.randint(0, V, (2, T)), focus) == 0.5


def test_the_answers_rule_picks_the_positions_before_each_answers_first_digit():
    """answer_start marks each bare answer's first digit x_t; the stream sits at position t - 1, which predicts it.
    Window 0: answers start at tokens 4 and 9 -> positions 3 and 8. Window 1: none -> padding only. Window 2: one
    at token 1 -> position 0; with an extra position 5 (answers+random) -> 0 and 5."""
    start = torch.zeros(3, 10, dtype=torch.bool)
    start[0, [4, 9]], start[2, 1] = True, True
    at, real = answer_positions(start)
    assert at.tolist() == [[3, 8], [0, 0], [0, 0]] and real.tolist() == [[True, True], [False, False], [True, False]]
    at, real = answer_positions(start, extra=torch.tensor([[3], [2], [5]]))   # 3 is already an answer position
    assert at[2].tolist() == [0, 5] and real.tolist() == [[True, True], [True, False], [True, True]]
    assert at[1, 0] == 2


def test_forced_thoughts_are_the_oracle_and_learn_by_their_nll_alone():
    """The warm start at full strength: every stream at an answer position carries the oracle tokens (nothing
    sampled there), REINFORCE sees none of them, and nll_forced is the mean NLL of the oracle's tokens computed by
    hand: the model run on the sequence x_0 .. x_i, <start>, c_1 .. c_L as ordinary causal text (fp64)."""
    qs = make_qstar(None, False, think_at="answers", n_thoughts=3, forced_nll_weight=1.0)
    tokens = torch.randint(0, V, (B, T))
    start = torch.zeros(B, T, dtype=torch.bool)
    start[0, 5], start[1, 8] = True, True                                 # positions 4 and 7 think
    oracle = torch.randint(1, V - 1, (B, T, L))
    qs.forced_fraction = 1.0
    seen = {}
    monkeypatch_think = qs.think

    def think(*args, **kwargs):
        ids, logp = monkeypatch_think(*args, **kwargs)
        seen["ids"], seen["logp"] = ids, logp
        return ids, logp
    qs.think = think
    valid_seen = {}
    original = levers.reinforce_loss
    levers.reinforce_loss = lambda advantage, logp, valid: valid_seen.setdefault("valid", valid) * 0 + original(
        advantage, logp, valid)
    try:
        out = qs(tokens, answer_start=start, oracle=oracle)
    finally:
        levers.reinforce_loss = original
    for b, i in ((0, 4), (1, 7)):
        for m in range(3):
            assert seen["ids"][b * 3 + m, 0].tolist() == oracle[b, i].tolist()
    assert not valid_seen["valid"].any()                                   # no sampled stream: REINFORCE is empty
    assert out["forced_streams"].item() == 1.0 and out["answer_streams"].item() == 0.0
    # by hand: log p(c_j | x_0 .. x_i, <start>, c_1 .. c_{j-1}) on the plain causal model
    start_marker, _ = qs.marker_embeddings()
    nlls = []
    for b, i in ((0, 4), (1, 7)):
        embeds = torch.cat([qs.model.embed(tokens[b, :i + 1]), start_marker[None], qs.model.embed(oracle[b, i])])
        h = qs.model.hidden(embeds[None], torch.arange(i + 2 + L))[0]
        logits = qs.thought_token_logits(h[i + 1:i + 1 + L])             # predicts c_1 .. c_L
        nlls.append(-logits.log_softmax(-1).gather(1, oracle[b, i][:, None]).sum() / L)
    assert out["nll_forced"].item() == pytest.approx(torch.stack(nlls).mean().item(), abs=1e-10)   # fp64 sums


def test_partly_forced_streams_mix_samples_and_the_oracle():
    qs = make_qstar(5, True, think_at="answers", n_thoughts=8)
    start = torch.zeros(B, T, dtype=torch.bool)
    start[:, 6] = True
    oracle = torch.randint(1, V - 1, (B, T, L))
    qs.forced_fraction = 0.5
    torch.manual_seed(0)
    out = qs(torch.randint(0, V, (B, T)), answer_start=start, oracle=oracle)
    assert 0 < out["forced_streams"].item() < 1 and out["answer_streams"].item() == 1.0
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and qs.markers.stored.grad.abs().max() > 0


def test_the_forced_fraction_schedule():
    """forced_steps 3, then a linear fall over forced_decay 4 steps: 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0."""
    cfg = train.TrainConfig(forced_steps=3, forced_decay=4)
    assert [train.forced_fraction(cfg, t) for t in range(9)] == pytest.approx([1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0])
    assert train.forced_fraction(train.TrainConfig(), 0) == 0.0          # no warm start: never forced


def test_problem_windows_hold_one_whole_problem_each():
    from data import ProblemWindows, bare_answer_spans
    tok = word_tokenizer(V - 1)
    texts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
    windows = ProblemWindows(texts, tok, 6, eos_id=0, seed=0, focus=lambda t: [(3, 5)] if t == "w4 w5" else [])
    assert windows.tokens[1].tolist()[:3] == tok.encode("w4 w5").ids + [0]
    assert windows.loss_mask.sum(1).tolist() == [4, 3, 5]                 # the tokens and their own EOS
    assert windows.focus[1].tolist() == [False, True, False, False, False, False]
    with pytest.raises(ValueError, match="--seq_len must hold the longest"):
        ProblemWindows(texts, tok, 4, eos_id=0, seed=0, focus=bare_answer_spans)
    batch = windows.batch(3, 5)
    assert set(batch) == {"tokens", "focus", "loss_mask"} and batch["tokens"].shape == (5, 6)


def test_headroom_reads_the_format_and_the_answer(monkeypatch):
    """A fake model answers add problems bare and right, sub problems worked and wrong by one, mul problems in
    neither format, multi problems bare and wrong: the chosen-format table counts exactly that. Held to a format,
    it answers add bare only, sub worked only, mul worked only (bare never ends), multi both: worked - bare is
    -1, +1, +1 and 0 with no spread (every problem agrees)."""
    from data import worked_steps

    def answer_of(prompt):
        steps = worked_steps(prompt)
        return int(steps.rstrip(".").split("=")[-1]), steps, next(c for c in steps if c in "+-*")

    def fake_decode(model, tokenizer, prompt, max_new_tokens, stop=()):
        answer, steps, op = answer_of(prompt)
        text = {"+": f" {answer}.\n", "-": f" {steps} The answer is {answer + 1}.\n", "*": " I do not know.\n"}
        return type("G", (), {"text": f" {answer - 1}.\n" if steps.count("=") == 3 else text[op]})()

    def fake_greedy(model, tokenizer, prompt, form, max_new_tokens):
        answer, steps, op = answer_of(prompt)
        kind = "multi" if steps.count("=") == 3 else {"+": "add", "-": "sub", "*": "mul"}[op]
        right = {"add": "bare", "sub": "worked", "mul": "worked", "multi": form}[kind] == form
        if form == "bare":
            return f"{answer if right else answer + 1}." if kind != "mul" else "4" * max_new_tokens
        return f"{steps} The answer is {answer if right else answer - 1}."
    monkeypatch.setattr(content, "decode", fake_decode)
    monkeypatch.setattr(content, "greedy_in_format", fake_greedy)
    table = content.headroom(None, None, n_per_kind=5)
    chosen = {kind: table[kind]["chosen"] for kind in table}
    assert chosen["add"]["bare"]["n"] == 5 and chosen["add"]["bare"]["accuracy"] == 1.0
    assert chosen["sub"]["worked"]["n"] == 5 and chosen["sub"]["worked"]["correct"] == 0
    assert chosen["mul"]["other"]["n"] == 5
    assert chosen["multi"]["bare"]["n"] == 5 and chosen["multi"]["bare"]["correct"] == 0
    forced = {kind: table[kind]["forced"] for kind in table}
    assert [(forced[k]["bare"]["correct"], forced[k]["worked"]["correct"]) for k in ("add", "sub", "mul", "multi")] \
        == [(5, 0), (0, 5), (0, 5), (5, 5)]
    assert [forced[k]["worked_minus_bare"] for k in ("add", "sub", "mul", "multi")] == \
        [(-1.0, -1.0, -1.0), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)]
    assert content.read_answer(" 4*6=24. 23+24=47. The answer is 47.\n") == ("worked", 47)
    assert content.read_answer(" 47.\nQ:") == ("bare", 47)
    assert "worked - bare" in content.format_headroom(table)


class CharTokenizer:
    """One token per character; the last id is EOS."""

    def __init__(self, chars: str):
        self.chars = chars

    def encode(self, text):
        return type("E", (), {"ids": [self.chars.index(c) for c in text]})()

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def token_to_id(self, c):
        return self.chars.index(c) if c in self.chars else None


class ScriptedModel:
    """A fake decoder whose next-token preference depends only on the text written after the prompt:
    prefs[text] lists characters, the most likely first ("$" for EOS); the cache is the token list."""

    def __init__(self, tokenizer, prompt, prefs):
        self.tok, self.start, self.prefs = tokenizer, len(prompt), prefs
        self.config = type("C", (), {"eos_ids": [len(tokenizer.chars)]})()

    def new_cache(self):
        self.cache = []
        return self.cache

    def embed(self, ids):
        return ids

    def hidden(self, ids, cache):
        cache.extend(ids[0].tolist())
        return torch.zeros(1, ids.shape[1], 1)

    def lm_head(self, h):
        logits = torch.full((1, 1, len(self.tok.chars) + 1), -1e9)
        for rank, c in enumerate(self.prefs.get(self.tok.decode(self.cache[self.start:]), "$")):
            logits[0, 0, len(self.tok.chars) if c == "$" else self.tok.chars.index(c)] = 10.0 - rank
        return logits


def test_greedy_in_format_holds_the_format_until_it_is_fixed():
    """A scripted model that would write "T" first (not a digit) and then "47." (bare): held bare, it writes "47."
    ("T" is not allowed); held worked, "." is not allowed before the first "=", so it takes its second choice "*"
    and, once "47*2=" is written, continues freely: "47*2=94. The answer is 94." up to the next question. EOS
    ends a free continuation; a held one never (it is not allowed) and stops at max_new_tokens."""
    tok = CharTokenizer("0123456789.+-*=\nQA:? Thanswrie")
    prompt = "Q: 23+24?\nA: "
    worked = "47*2=94. The answer is 94.\nQ:"
    prefs = {worked[:i]: worked[i] for i in range(len(worked))} | {"": "T4", "47": ".*"}
    model = ScriptedModel(tok, prompt, prefs)
    assert content.greedy_in_format(model, tok, prompt, "bare") == "47."
    assert content.greedy_in_format(model, tok, prompt, "worked") == "47*2=94. The answer is 94."
    model.prefs = {"": "4", "4": "=", "4=": "$4"}                      # free after "=": EOS ends it
    assert content.greedy_in_format(model, tok, prompt, "worked") == "4="
    model.prefs = {"": "4", "4": "$7", "47": "$7"}                     # held bare: no EOS, the best allowed is "7"
    assert content.greedy_in_format(model, tok, prompt, "bare", max_new_tokens=3) == "477"
    with pytest.raises(ValueError, match="no single token"):
        content.greedy_in_format(model, CharTokenizer("0123456789"), prompt, "bare")


def test_the_mixing_head_learns_from_the_models_own_thoughts_only():
    """head_ignores (B*M, K) detaches the mixing weight of those streams: a loss on them alone gives the head no
    gradient (the rest of the model still learns from it), a loss on the others gives the head exactly the gradient
    it gets when nothing is ignored. Thoughts given, so both runs see the same streams."""
    qs = make_qstar(None, False, think_at="answers")
    tokens, at = torch.randint(0, V, (B, T)), AT[:, :3]                         # K = 3 positions, all with a target
    thought_ids = torch.randint(1, V - 1, (B * M, 3, L))
    ignored = torch.tensor([[True, False, True], [False, False, True], [True, True, False], [False, True, False]])
    head = [p for n, p in qs.named_parameters() if n.startswith("mixing_head")]

    def grads(keep, ignore):
        qs.zero_grad()
        qs.head_ignores = ignore
        h_base, cache = qs.base_pass(tokens)
        qs.think(tokens, cache, M, thought_ids, at)
        (qs.talk(tokens, h_base, cache, M)["logp_mixed"] * keep[:, None, :]).sum().backward()
        qs.head_ignores = None
        return ([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in head],
                qs.markers.stored.grad.clone())
    head_forced, markers_forced = grads(ignored, ignored)
    assert all(g.abs().max() == 0 for g in head_forced) and markers_forced.abs().max() > 0
    head_own, _ = grads(~ignored, ignored)
    head_plain, _ = grads(~ignored, None)
    assert all(g.abs().max() > 0 for g in head_own[-1:])
    for a, b in zip(head_own, head_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("from_forced", [True, False])
def test_fully_forced_steps_train_the_mixing_head_only_if_it_learns_from_forced_thoughts(from_forced):
    qs = make_qstar(None, False, think_at="answers", n_thoughts=3, mixing_from_forced=from_forced)
    start = torch.zeros(B, T, dtype=torch.bool)
    start[0, 5], start[1, 8] = True, True
    qs.forced_fraction = 1.0
    out = qs(torch.randint(0, V, (B, T)), answer_start=start, oracle=torch.randint(1, V - 1, (B, T, L)))
    out["loss"].backward()
    last = qs.mixing_head.net[-1].weight.grad
    assert (last is not None and last.abs().max() > 0) == from_forced
    assert qs.markers.stored.grad.abs().max() > 0 and qs.head_ignores is None


@pytest.mark.parametrize("think_at", ["all", "answers", "answers+random:0.1", "entropy:0.25", "random:0.25"])
def test_the_content_reward_scores_where_training_thinks(think_at):
    """The content reward's positions: every position with a next token under all and the answers rules (where the
    answers are is not known there, so answers+random:Q is scored like answers), ceil(Q * (T-1)) per window under
    entropy:Q and random:Q (select_positions' count). How often those include an answer's first digit exists only
    for entropy and random."""
    qs = make_qstar(None, False, think_at=think_at).eval()
    tokens = torch.randint(0, V, (B, T))
    _, _, where = content.thought_rewards_at(qs, tokens)
    q = {"entropy:0.25": 0.25, "random:0.25": 0.25}.get(think_at)
    expected = [math.ceil(q * (T - 1))] * B if q else [T - 1] * B
    assert where.sum(dim=1).tolist() == expected and not where[:, -1].any()
    focus = torch.zeros(B, T - 1, dtype=torch.bool)
    focus[:, 4] = True
    selected = content.answers_selected(qs, tokens, focus)                      # the held-out answers' statistic
    assert (selected is None) == (q is None) and (q is None or 0 <= selected <= 1)


def test_thought_accuracy_counts_the_whole_answer_by_hand():
    """A thought writes the answer when the whole number appears in it, not as a digit of a longer one."""
    tok = CharTokenizer("0123456789=A:. ")
    windows = torch.tensor([tok.encode("A: 15.").ids, tok.encode("A: 7..").ids])            # (W=2, T=6)
    focus = torch.zeros(2, 5, dtype=torch.bool)                                              # targets: answer digits
    focus[0, 2:4] = True                                                                     # "1", "5"
    focus[1, 2] = True                                                                       # "7"
    thought_ids = torch.full((2, 5, 4), tok.token_to_id("."))
    donor_ids = thought_ids.clone()
    thought_ids[0, 2], thought_ids[1, 2] = torch.tensor(tok.encode("=15.").ids), torch.tensor(tok.encode("=17.").ids)
    donor_ids[0, 2], donor_ids[1, 2] = torch.tensor(tok.encode("150.").ids), torch.tensor(tok.encode(".7=.").ids)
    got = content.answer_thoughts(tok, windows, focus, {"thought_ids": thought_ids, "donor_ids": donor_ids})
    # window 0: "=15." writes 15 (hit), its donor "150." does not (15 inside 150); window 1: "=17." holds 7 only as
    # a digit of 17 (miss), its donor ".7=." writes it (hit)
    assert got["sampled_hits"] == [1, 0] and got["answer_in_sampled_thought"] == 0.5
    assert got["answer_in_shuffled_thought"] == 0.5
    assert got["thoughts"] == ["=15.", "=17."] and [e["answer"] for e in got["examples"]] == ["15", "7"]


@pytest.mark.parametrize("padding", ["front", "end"])
def test_the_warm_start_forces_the_worked_step_padded_as_the_run_chose(padding):
    """train.step_inputs hands the forced thoughts to the model in the run's --oracle_padding: the worked step with
    the filler in front of it or after it."""
    from types import SimpleNamespace

    import numpy as np

    from data import filler_token_id
    from machinery.hf_io import load_pretrained
    _, tok = load_pretrained("smollm2-135m")
    text = ("Q: Ben has 46 books, buys 4 bags with 8 books each, then gives away 22. How many books does Ben have "
            "now?\nA: 56.\n")
    enc = tok.encode(text)
    digits = [j for j, (a, b) in enumerate(enc.offsets) if a > len(text) - 6 and text[a:b].strip().isdigit()]
    focus = np.zeros((1, len(enc.ids)), dtype=bool)
    focus[0, digits] = True                                                        # the answer's digit tokens
    cfg = LeverConfig(thought_len=12, oracle_padding=padding, think_at="answers")
    qs = Levers(tiny_model(tok.get_vocab_size(), window=None), cfg, tok)
    qs.forced_fraction = 1.0
    filler = filler_token_id(tok)
    run = SimpleNamespace(qs=qs, device="cpu", tokenizer=tok, filler_id=filler)
    inputs = train.step_inputs(run, {"tokens": np.array([enc.ids]), "focus": focus}, thinking=True)
    step = tok.encode("78-22=56.", add_special_tokens=False).ids                  # 46 + 4*8 = 78, 78 - 22 = 56
    pad = [filler] * (12 - len(step))
    assert inputs["oracle"][0, digits[0] - 1].tolist() == (pad + step if padding == "front" else step + pad)
    with pytest.raises(ValueError, match="--oracle_padding must be front or end"):
        LeverConfig(oracle_padding="back")


@pytest.mark.parametrize("base_learns", [True, False])
def test_without_base_learning_the_answers_only_a_thought_lowers_their_nll(base_learns):
    """base_learns_answers False: the base NLL is the mean over the targets that are not answer digits (by hand, from
    the plain causal model's log-softmax), and the base states that predict an answer digit get no gradient at all
    (their NLL is out of the base term and the mixed prediction's base half is detached); the other base states
    and the thought's path still learn. With the lever off, those states get a gradient."""
    qs = make_qstar(None, False, think_at="answers", policy_weight=0.0, post_nll_weight=0.0,
                    base_learns_answers=base_learns)
    tokens = torch.randint(0, V, (B, T))
    digits = torch.zeros(B, T, dtype=torch.bool)
    digits[0, 5:7], digits[1, 8:10] = True, True                      # two answers of two digits
    start = digits & ~torch.nn.functional.pad(digits, (1, 0))[:, :-1]
    seen = {}
    base_pass = qs.base_pass

    def keep_base(tokens_):
        h, cache = base_pass(tokens_)
        h.retain_grad()
        seen["h"] = h
        return h, cache
    qs.base_pass = keep_base
    out = qs(tokens, answer_start=start, answer_digits=digits)
    out["loss"].backward()
    grad_norm = seen["h"].grad.norm(dim=-1)                             # (B, T): position i predicts x_{i+1}
    predicts_digit = digits[:, 1:]
    assert (grad_norm[:, :-1][~predicts_digit] > 0).all()
    assert (grad_norm[:, :-1][predicts_digit] > 0).all() == base_learns
    if not base_learns:
        assert (grad_norm[:, :-1][predicts_digit] == 0).all() and qs.markers.stored.grad.abs().max() > 0
        logp = qs.model.lm_head(qs.model.hidden(qs.model.embed(tokens), torch.arange(T))).log_softmax(-1)
        nll = -logp[:, :-1].gather(2, tokens[:, 1:, None])[..., 0]
        by_hand = nll[~predicts_digit].mean()
        assert out["loss"].item() == pytest.approx(0.5 * by_hand.item() + 0.5 * out["nll_talk"].item(), abs=1e-10)


def test_without_base_learning_the_answers_needs_where_they_are():
    qs = make_qstar(None, False, think_at="answers", base_learns_answers=False)
    start = torch.zeros(B, T, dtype=torch.bool)
    start[0, 5] = True
    with pytest.raises(ValueError, match="needs where the bare answers are"):
        qs(torch.randint(0, V, (B, T)), answer_start=start)


def start_policy_pair(temperature=0.5, **overrides):
    """A policy and a start policy that differs from it (other trunk weights, other markers), both fp64."""
    qs = make_qstar(None, False, think_at="answers", thought_temperature=temperature, **overrides)
    start = make_qstar(None, False, think_at="answers", thought_temperature=temperature, **overrides)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.2 * torch.randn_like(p))
    qs.set_start_policy(start.requires_grad_(False))
    return qs, start


def test_the_log_ratio_to_the_start_policy_by_hand():
    """log pi(c) - log pi_start(c) of a given thought, each the sum over its tokens of log softmax(logits / T)[c_j]
    of the model run on x_0 .. x_i, <start>, c_1 .. c_{j-1} as ordinary causal text (fp64), T = 0.5."""
    qs, start = start_policy_pair(kl_to_start=0.1)
    tokens, at = torch.randint(0, V, (B, T)), AT[:, :2]
    thought_ids = torch.randint(1, V - 1, (B * M, 2, L))
    _, cache = qs.base_pass(tokens)
    _, logp = qs.think(tokens, cache, M, thought_ids, at)
    ratio = qs.log_ratio_to_start(tokens, thought_ids, logp, at)

    def by_hand(policy, b, i, c):
        marker, _ = policy.marker_embeddings()
        embeds = torch.cat([policy.model.embed(tokens[b, :i + 1]), marker[None], policy.model.embed(c)])
        h = policy.model.hidden(embeds[None], torch.arange(i + 2 + L))[0]
        logits = policy.thought_token_logits(h[i + 1:i + 1 + L]) / 0.5
        return logits.log_softmax(-1).gather(1, c[:, None]).sum()
    for row in range(B * M):
        for k in range(2):
            b, i, c = row // M, int(at[row // M, k]), thought_ids[row, k]
            expected = by_hand(qs, b, i, c) - by_hand(start, b, i, c)
            assert ratio[row, k].item() == pytest.approx(expected.item(), abs=1e-10)


def test_the_kl_term_lowers_each_own_thoughts_reward_by_beta_times_its_log_ratio(monkeypatch):
    """REINFORCE sees reward - beta * log(pi / pi_start) on the model's own samples (every stream here); with the
    start policy equal to the policy the log-ratio is 0 and the loss is the one without the term."""
    tokens = torch.randint(0, V, (B, T))
    start = torch.zeros(B, T, dtype=torch.bool)
    start[0, 5], start[1, 8] = True, True
    rewards, ratios = [], []
    original = levers.lever_advantages
    monkeypatch.setattr(levers, "lever_advantages", lambda reward, *a, **k: rewards.append(reward) or original(
        reward, *a, **k))
    outs = {}
    for beta in (0.0, 0.25):
        torch.manual_seed(11)
        qs, _ = start_policy_pair(kl_to_start=beta)
        log_ratio = qs.log_ratio_to_start
        qs.log_ratio_to_start = lambda *a: ratios.append(log_ratio(*a)) or ratios[-1]
        torch.manual_seed(5)
        outs[beta] = qs(tokens, answer_start=start)
    assert len(ratios) == 1 and ratios[0].abs().min() > 0
    torch.testing.assert_close(rewards[0] - rewards[1], 0.25 * ratios[0].view(B, M, 1), rtol=0, atol=1e-12)
    assert outs[0.25]["kl_to_start"].item() == pytest.approx(ratios[0].mean().item(), abs=1e-12)
    torch.manual_seed(11)
    same, _ = start_policy_pair(kl_to_start=0.25)
    same.set_start_policy(copy.deepcopy(same).requires_grad_(False))
    torch.manual_seed(5)
    out_same = same(tokens, answer_start=start)
    assert out_same["kl_to_start"].item() == 0
    assert out_same["loss"].item() == pytest.approx(outs[0.0]["loss"].item(), abs=1e-12)


def test_the_kl_term_needs_a_start_policy():
    qs = make_qstar(None, False, think_at="answers", kl_to_start=0.1)
    start = torch.zeros(B, T, dtype=torch.bool)
    start[0, 5] = True
    with pytest.raises(ValueError, match="needs the policy the thinking phase starts from"):
        qs(torch.randint(0, V, (B, T)), answer_start=start)
    with pytest.raises(ValueError, match="kl_to_start must be 0 or more"):
        LeverConfig(kl_to_start=-1.0)
    assert "start_policy" not in dict(qs.named_modules()) and not any("start_policy" in k for k in qs.state_dict())


def think_at_digits(think_at: str):
    """A fully warm-started forward on two windows with answer digits at tokens 5, 6 (window 0) and 8, 9 (window 1).
    -> (qs, inputs, out, seen): seen["at"] (B, K) the streams' positions, seen["ids"] (B*M, K, L) their thoughts."""
    qs = make_qstar(None, False, think_at=think_at, n_thoughts=2)
    digits = torch.zeros(B, T, dtype=torch.bool)
    digits[0, 5:7], digits[1, 8:10] = True, True
    inputs = dict(tokens=torch.randint(0, V, (B, T)), answer_digits=digits, oracle=torch.randint(1, V - 1, (B, T, L)),
                  answer_start=digits & ~torch.nn.functional.pad(digits, (1, 0))[:, :-1])
    seen = {}
    streams = qs.streams

    def keep(tokens_, target_ok, h_base, cache, logp_base, at, thought_ids):
        seen["at"], seen["ids"] = at, thought_ids
        return streams(tokens_, target_ok, h_base, cache, logp_base, at, thought_ids)
    qs.streams = keep
    qs.forced_fraction = 1.0
    return qs, inputs, qs(**inputs), seen


def test_the_digits_rule_thinks_before_every_digit_of_a_bare_answer():
    """think_at digits: a stream at every position whose next token is an answer digit (window 0: digits at tokens
    5, 6 -> positions 4, 5; window 1: 8, 9 -> 7, 8), and the warm start forces the oracle at each of them."""
    qs, inputs, out, seen = think_at_digits("digits")
    assert seen["at"].tolist() == [[4, 5], [7, 8]] and out["forced_streams"].item() == 1.0
    for b, positions in ((0, (4, 5)), (1, (7, 8))):
        for k, i in enumerate(positions):
            for m in range(2):
                assert seen["ids"][b * 2 + m, k].tolist() == inputs["oracle"][b, i].tolist()
    with pytest.raises(ValueError, match="needs where the bare answers start"):
        qs(inputs["tokens"], answer_start=inputs["answer_start"])


def test_digits_and_random_positions_think_at_every_digit_and_q_of_the_rest():
    """think_at digits+random:Q: the digits rule's positions plus ceil(Q * (T-1)) random ones with a target. With
    Q = 1 that is every position 0 .. T-2 in every window, and the warm start forces the oracle at the digits' only."""
    _, inputs, _, seen = think_at_digits("digits+random:1.0")
    assert seen["at"].tolist() == [list(range(T - 1))] * B
    for b, positions in ((0, (4, 5)), (1, (7, 8))):
        for i in range(T - 1):
            forced = all(seen["ids"][b * 2 + m, i].tolist() == inputs["oracle"][b, i].tolist() for m in range(2))
            assert forced == (i in positions), (b, i)
