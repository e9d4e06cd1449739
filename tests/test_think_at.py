"""Thinking where it matters (think_at entropy:Q), groups of thoughts, the two reward sources and the bounded mixing
weight. Thinking at a subset of positions must equal thinking at every position restricted to that subset: the
streams never see each other, so the same thoughts give the same log-probs, rewards and gradients."""

import math

import pytest
import torch
from conftest import tiny_model, word_tokenizer

import fast
import qstar
from qstar import (MixingHead, QuietStar, QuietStarConfig, advantages, at_streams, reward_sources,
                   select_positions)

V, B, T, L, M = 37, 2, 11, 3, 2
AT = torch.tensor([[0, 4, 7, 9], [2, 3, 8, 10]])      # (B, K=4), unequal gaps; 10 = T-1 has no next token


def make_qstar(window, fast_paths, **overrides) -> QuietStar:
    cfg = QuietStarConfig(**dict(thought_len=L, n_true=3, n_thoughts=M, thought_nll_weight=0.5) | overrides)
    qs = QuietStar(tiny_model(V, window=window), cfg, word_tokenizer(V - 1)).double()
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
    assert (sub["logp"][-1, :, -1] == 0).all()                            # position T-1: nothing to predict
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
    monkeypatch.setattr(qstar, "reinforce_loss", lambda reward, *a: seen.setdefault("reward", []).append(reward)
                        or reward.sum() * 0)
    monkeypatch.setattr(qstar, "select_positions", lambda logits, ok, fraction, by: seen.setdefault("by", by) and AT)

    def think(tokens, cache, n_thoughts, thought_ids=None, at=None):
        given = ids if at is None else ids.gather(1, at.repeat_interleave(M, 0)[..., None].expand(-1, -1, L))
        return QuietStar.think(qs, tokens, cache, n_thoughts, given, at)
    monkeypatch.setattr(qs, "think", think)
    for reward_from, rule in (("mixed", "entropy"), ("thought", "random")):
        seen.clear()
        qs.config.reward_from, qs.config.think_at = reward_from, "all"
        qs(tokens)
        qs.config.think_at = f"{rule}:0.4"
        qs(tokens)
        full, sub = seen["reward"]                                         # (B, M, T) and (B, M, K)
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
    assert QuietStarConfig().think_fraction is None
    assert QuietStarConfig(think_at="entropy:0.1").think_fraction == 0.1
    assert QuietStarConfig(think_at="random:0.25").think_fraction == 0.25
    for bad in ("entropy", "entropy:0", "entropy:1.5", "uniform:0.1", "random:2", "entropy:x"):
        with pytest.raises(ValueError, match="--think_at must be all, entropy:Q or random:Q"):
            QuietStarConfig(think_at=bad)
    with pytest.raises(ValueError, match="--reward_from must be mixed or thought"):
        QuietStarConfig(reward_from="mix")


def test_group_advantages_by_hand():
    reward = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 4, 1)            # (B=1, M=4, K=1)
    assert advantages(reward, clip_negative=False).flatten().tolist() == [-2.0, -1.0, 0.0, 3.0]   # minus mean 3
    std = math.sqrt((4 + 1 + 0 + 9) / 3)                                   # sample std of 1, 2, 3, 6: 2.1602
    expected = [-2 / std, -1 / std, 0.0, 3 / std]
    got = advantages(reward, clip_negative=False, group_std=True).flatten().tolist()
    assert got == pytest.approx(expected, rel=1e-4)                        # the +1e-4 in the denominator: 5e-5
    assert advantages(reward, clip_negative=True, group_std=True).flatten().tolist() == pytest.approx(
        [0, 0, 0, 3 / std], rel=1e-4)
    same = torch.full((1, 16, 3), 0.7)                                     # M = 16, all equal: nothing to learn
    assert advantages(same, clip_negative=False, group_std=True).abs().max() == 0


def test_reward_sources_by_hand():
    """M = 2, two positions. Mixed rewards (0.1, 0.3) and (0.2, 0.2); post-thought ones (1.0, -1.0), (0.5, 2.0)."""
    rewards = {"mixed": torch.tensor([[0.1, 0.2], [0.3, 0.2]]),          # (B*M = 2, K = 2): thought 0, thought 1
               "thought": torch.tensor([[1.0, 0.5], [-1.0, 2.0]])}
    out = reward_sources(rewards, torch.ones(1, 2, dtype=torch.bool), 2)
    assert out["reward_gap_mixed"].item() == pytest.approx((0.2 + 0.0) / 2)
    assert out["reward_gap_thought"].item() == pytest.approx((2.0 + 1.5) / 2)
    # position 0: mixed says thought 1 is better, post-thought says thought 0; position 1: a tie against thought 1
    assert out["reward_agreement"].item() == 0.0
    assert reward_sources(rewards, torch.ones(2, 2, dtype=torch.bool), 1) == {}


def test_bounded_mixing_weight_starts_at_one_percent_and_stays_in_0_1():
    head = MixingHead(6, 5, bounded=True)
    h = torch.randn(3, 6)
    assert torch.allclose(head(h, h), torch.full((3, 1), 0.01), atol=1e-5)   # sigmoid(-4.595) = 0.010001
    torch.nn.init.normal_(head.net[-1].weight, std=100.0)
    w = head(100 * torch.randn(50, 6), 100 * torch.randn(50, 6))
    assert (w >= 0).all() and (w <= 1).all() and w.min() < 0.01 < 0.99 < w.max()
    assert (MixingHead(6, 5)(h, h) == 0).all()                           # the official head starts at exactly 0


def test_the_post_thought_nll_term_trains_the_post_thought_path():
    """thought_nll_weight > 0 adds its NLL to the loss; the loss moves by exactly weight * nll_unmixed."""
    tokens = torch.randint(0, V, (B, T))
    outs = {}
    for weight in (0.0, 0.5):
        qs = make_qstar(5, True, thought_nll_weight=weight)
        torch.manual_seed(3)
        outs[weight] = qs(tokens)
    assert outs[0.0]["nll_unmixed"].item() == pytest.approx(outs[0.5]["nll_unmixed"].item(), abs=1e-12)
    assert (outs[0.5]["loss"] - outs[0.0]["loss"]).item() == pytest.approx(0.5 * outs[0.5]["nll_unmixed"].item(),
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
    """eval.score_focus thinks at the focus positions alone; there it equals token_scores with the same thoughts
    (sampled, another window's, filler, oracle). Outputs are rounded to fp32 from this fp64 model: 4 x 6e-8."""
    import eval as qeval
    qs = make_qstar(5, True, n_thoughts=1)
    W = 5
    windows, oracle = torch.randint(0, V, (W, T)), torch.randint(0, V, (W, T, L))
    focus = torch.zeros(W, T - 1, dtype=torch.bool)
    focus[:, 6], focus[:3, 7], focus[4] = True, True, False               # 1 or 2 answer digits; none in one
    got = qeval.score_focus(qs, windows, focus, 5, batch_size=2, oracle=oracle)
    for name, thoughts in (("sampled", got["thought_ids"]), ("shuffled", got["donor_ids"]), ("oracle", oracle),
                           ("filler", torch.full_like(oracle, 5))):
        full = qeval.token_scores(qs, windows, thoughts)
        assert torch.allclose(full["nll_thought"][focus].float(), got[name][focus], atol=1e-6, rtol=0), name
    assert torch.allclose(qeval.token_scores(qs, windows)["nll_base"][focus].float(), got["none"][focus], atol=1e-6)
    assert (got["sampled"][~focus] == 0).all()
    # the shuffled thought at an answer is the next window's thought at its answer
    assert torch.equal(got["donor_ids"][0, 6], got["thought_ids"][1, 6])
    compared = qeval.compare_thoughts(got, focus, focus_only=True)       # nothing else was scored
    assert set(compared) == {"focus", "mix_weight"} and "oracle-none" in compared["focus"]["diff"]
    assert compared["focus"]["n_tokens"] == 7


def test_answers_selected_counts_answers_whose_first_digit_is_chosen(monkeypatch):
    import eval as qeval
    qs = make_qstar(5, True, think_at="entropy:0.2")
    focus = torch.zeros(2, T - 1, dtype=torch.bool)
    focus[0, [3, 4]], focus[1, 5] = True, True                            # first digits predicted at 3 and 5
    monkeypatch.setattr(qeval, "select_positions", lambda logits, ok, q, by: torch.tensor([[3, 7], [1, 2]]))
    assert qeval.answers_selected(qs, torch.randint(0, V, (2, T)), focus) == 0.5
