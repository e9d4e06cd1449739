"""The LM head's log-probability of chosen tokens, without keeping the (.., V) logits for backward.

    log p(target | h) = log_softmax(lm_head(h) / temperature)[target]        h (.., D) -> (..)

Quiet-STaR asks this of almost every pass: the base pass, each thought token (REINFORCE needs the log-prob of the
sampled token) and each talk pass. Written plainly, log_softmax keeps its (.., V) output for backward (SmolLM2,
V = 49152: 100 MB per pass of 2 x 256 tokens, 2.8 GB per step at k = 12), and its backward makes two more such
tensors (the gather's zero-filled gradient, the softmax gradient). TokenLogProb keeps only h and the
log-sum-exp (one number per row). Backward recomputes the logits with one matmul and turns them, in place,
into the gradient of the logits:  d log p(t) / d logits = (onehot(t) - softmax) / temperature.
This is what activation checkpointing would do for the LM head, in two passes over (.., V) instead of seven.
tests/test_token_logprob.py checks values and gradients against log_softmax + gather (gradcheck in fp64).

Thought tokens are sampled from the same logits in the same forward: pass `targets` as a function of the
(.., V) logits (EOS and special tokens already at -inf) that returns the chosen tokens.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def lm_head_logits(h: Tensor, weight: Tensor, bias: Tensor | None, banned: Tensor | None) -> Tensor:
    """lm_head(h), promoted to at least fp32 (bf16 logits are too coarse for a softmax), banned ids at -inf."""
    logits = F.linear(h, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if banned is None else logits.index_fill_(-1, banned, float("-inf"))


class TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, banned):
        device = h.device.type     # under autocast the matmul runs in bf16; backward repeats that by hand
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        logits = lm_head_logits(h, weight, bias, banned)                        # (.., V), fp32 or fp64
        if callable(targets):
            targets = targets(logits)                                           # sampled from these logits
        scaled = logits if temperature == 1 else logits.div_(temperature)
        lse = scaled.logsumexp(dim=-1)                                          # (..)
        logp = scaled.gather(-1, targets[..., None])[..., 0] - lse
        ctx.save_for_backward(h, weight, bias, targets, lse, banned)
        ctx.temperature, ctx.dtype = temperature, dtype
        ctx.mark_non_differentiable(targets)
        return logp, targets

    @staticmethod
    def backward(ctx, grad_logp, _grad_targets):
        h, weight, bias, targets, lse, banned = ctx.saved_tensors
        dtype = ctx.dtype
        h_, weight_, bias_ = (None if t is None else t.to(dtype) for t in (h, weight, bias))
        grad = lm_head_logits(h_, weight_, bias_, banned)                       # recomputed: (.., V)
        if ctx.temperature != 1:
            grad.div_(ctx.temperature)
        grad.sub_(lse[..., None]).exp_()                                        # softmax (0 at banned ids)
        grad.mul_(-grad_logp[..., None]).scatter_add_(-1, targets[..., None], grad_logp[..., None])
        if ctx.temperature != 1:
            grad.div_(ctx.temperature)                                          # d logp / d logits, times grad
        grad = grad.to(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = (grad @ weight_).to(h.dtype) if need_h else None
        flat = grad.flatten(0, -2)                                              # (rows, V)
        grad_w = (flat.T @ h_.flatten(0, -2)).to(weight.dtype) if need_w else None
        grad_b = flat.sum(0).to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None


def token_logprob(head: torch.nn.Linear, h: Tensor, targets, temperature: float = 1.0,
                  banned: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """h (.., D), targets (..) ids or a function (.., V) logits -> (..) ids; -> (log-prob (..), targets (..)).

    Equal to F.log_softmax(head(h) with banned ids at -inf, divided by temperature)[targets], with its gradient
    for h, head.weight and head.bias."""
    return TokenLogProb.apply(h, head.weight, head.bias, targets, temperature, banned)
