"""fast.token_logprob against its definition, log_softmax(lm_head(h) / temperature)[target] with banned ids at -inf:
values and gradients (gradcheck in fp64, all three inputs), the sampled tokens, a frozen head, and bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from fast import TokenLogProb, token_logprob

D, V = 6, 11


def reference(h, weight, bias, targets, temperature=1.0, banned=None):
    logits = F.linear(h, weight, bias)
    if banned is not None:
        logits = logits.index_fill(-1, banned, float("-inf"))
    return (logits / temperature).log_softmax(-1).gather(-1, targets[..., None])[..., 0]


@pytest.mark.parametrize("temperature,with_bias,with_banned", [(1.0, False, False), (3.0, True, True),
                                                               (0.5, False, True)])
def test_values_and_gradients_equal_log_softmax(temperature, with_bias, with_banned):
    h = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True) if with_bias else None
    banned = torch.tensor([0, 7]) if with_banned else None
    targets = torch.tensor([[1, 2, 10], [3, 3, 5]])

    def fused(h, weight, bias):
        return TokenLogProb.apply(h, weight, bias, targets, temperature, banned)[0]
    inputs = (h, weight, bias)
    assert torch.autograd.gradcheck(fused, inputs)
    out, ref = fused(*inputs), reference(h, weight, bias, targets, temperature, banned)
    # fp64 rounds at 1.1e-16: a log-sum-exp of 11 logits <= ~15 after 6-term dot products, ~1e-14 at most
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    grads = torch.autograd.grad(out.sum() * 1.7, [t for t in inputs if t is not None])
    ref_grads = torch.autograd.grad(ref.sum() * 1.7, [t for t in inputs if t is not None])
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-12, rtol=0)


def test_sampled_tokens_come_from_the_banned_logits_and_get_their_log_prob():
    head = torch.nn.Linear(D, V, bias=False)
    h, banned = torch.randn(4, 5, D), torch.tensor([2, 3])
    seen = {}

    def choose(logits):                   # what the sampler sees: the LM head's logits, banned ids at -inf
        seen["logits"] = logits.clone()
        return logits.argmax(-1)
    logp, tokens = token_logprob(head, h, choose, 2.0, banned)
    expected = head(h).index_fill(-1, banned, float("-inf"))
    assert torch.equal(seen["logits"], expected)
    assert torch.equal(tokens, expected.argmax(-1)) and not torch.isin(tokens, banned).any()
    # fp32 log-probs ~2, one log-sum-exp of 11 logits apart (measured 2.4e-7); allclose allows 1e-6 + 1e-5 x 2
    assert torch.allclose(logp, reference(h, head.weight, None, tokens, 2.0, banned), atol=1e-6)
    assert not tokens.requires_grad


def test_a_frozen_head_gets_no_gradient_and_h_still_does():
    head = torch.nn.Linear(D, V, bias=False).requires_grad_(False)
    h = torch.randn(3, D, requires_grad=True)
    targets = torch.tensor([1, 4, 9])
    token_logprob(head, h, targets)[0].sum().backward()
    assert head.weight.grad is None
    expected, = torch.autograd.grad(reference(h, head.weight, None, targets).sum(), h)
    assert torch.allclose(h.grad, expected, atol=1e-6)      # fp32 sums of 11 terms ~1 in another order: ~1e-7


def test_bf16_autocast_matches_the_plain_path_under_autocast():
    """Under autocast the matmul runs in bf16 in forward and, by hand, in backward; the softmax in fp32. The
    plain path under the same autocast makes the same roundings: equal within bf16's last bits."""
    head = torch.nn.Linear(D, V, bias=False)
    h = torch.randn(4, D, requires_grad=True)
    targets = torch.tensor([0, 5, 6, 10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_logprob(head, h, targets)[0]
        ref = head(h).float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    # the same bf16 matmul, then fp32 log-softmax: fp32 apart (measured 1.2e-7 at values ~3)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)
    grads = torch.autograd.grad(out.sum(), [h, head.weight])
    ref_grads = torch.autograd.grad(ref.sum(), [h, head.weight])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype == torch.float32
        # bf16 operands round at 2^-9; the hand backward and autograd may round at other steps: 2e-2 of the largest
        # is ~10 such roundings (measured: equal bit for bit)
        assert torch.allclose(g, r, atol=2e-2 * r.abs().max().item())
