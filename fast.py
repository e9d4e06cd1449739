"""The fast twins of three plain steps of qstar.py: the same values and gradients (tests/test_qstar.py and
tests/test_fast.py prove it), less time and memory. fast.use(qs) swaps all three in (one switch each); train.py
does with --fast (on in --preset paper and answers).

1. ThoughtCache, twin of qstar.DenseThoughtCache: the thought passes' attention without the dense mask. A thought
   query attends
     (a) causally to the T real keys, through SDPA's fused kernel (no T x T matrix is kept), and
     (b) to its own `offset` thought keys, a (T, offset) score matrix,
   and the two softmaxes are merged exactly. The merge needs the log-sum-exp of (b), which we hand to SDPA as
   one extra "summary" key: an extra channel gives query i the score lse_i against the summary key, and the
   summary value carries a 1 in an extra channel, so SDPA returns, per query,
       out[:E] = Z_real / (Z_real + Z_own) * softmax_real @ V_real        out[E] = Z_own / (Z_real + Z_own)
   and the full answer is out[:E] + out[E] * (softmax_own @ V_own). Autograd runs through SDPA as usual.
   The M thoughts read the real keys of their text, copied once per layer (not once per pass).

2. token_logprob, twin of qstar.token_logprob: log_softmax(lm_head(h) / temperature)[target] without keeping the
   (.., V) logits for backward. Quiet-STaR asks this of almost every pass (the base pass, each thought token,
   each talk pass). Written plainly, log_softmax keeps its (.., V) output for backward (SmolLM2, V = 49152:
   100 MB per pass of 2 x 256 tokens, 2.8 GB per step at L = 12), and its backward makes two more such tensors.
   TokenLogProb keeps only h and the log-sum-exp (one number per row); backward recomputes the logits with one
   matmul and turns them, in place, into the gradient  d log p(t) / d logits = (onehot(t) - softmax) / temperature:
   what activation checkpointing would do for the LM head, in two passes over (.., V) instead of seven. Thought
   tokens are sampled from the same logits in the same forward (`targets` a function of the logits, as in qstar).

3. sparse_embed, twin of model.embed for thought and teacher-forced tokens: a sparse gradient, because each of
   the many lookups per step would otherwise write a dense (V, D) gradient (a 113 MB memset per pass for
   SmolLM2). The base pass's dense lookup keeps the summed gradient dense for the optimizer. Off under DDP and
   FSDP, which reduce dense gradients.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from model import attend, upcast
from qstar import DenseThoughtCache, QuietStar, head_logits
from qstar import token_logprob as plain_token_logprob


def use(qs: QuietStar, fast: bool = True, *, attention: bool | None = None, logprob: bool | None = None,
        sparse_embeddings: bool | None = None) -> QuietStar:
    """Swap fast.py's twins into qs, each by its own switch (None: as `fast`); fast=False: all plain. -> qs"""
    qs.thought_cache = ThoughtCache if (fast if attention is None else attention) else DenseThoughtCache
    qs.token_logprob = token_logprob if (fast if logprob is None else logprob) else plain_token_logprob
    qs.embed_ids = partial(sparse_embed, qs.model.embed_tokens) if (
        fast if sparse_embeddings is None else sparse_embeddings) else qs.model.embed
    return qs


def sparse_embed(embedding: torch.nn.Embedding, ids: Tensor) -> Tensor:
    return F.embedding(ids, embedding.weight, sparse=torch.is_grad_enabled())


# ---- 1. thought attention without the mask -----------------------------------------------------------------

class ThoughtCache:
    """The fast twin of qstar.DenseThoughtCache: real keys (B, K, T, E) from the base pass, thought keys per pass
    (B*M, K, T, E), no T x T*offset mask and no concatenated cache: each pass reads the earlier passes' keys
    where they are."""

    def __init__(self, n_layers: int, window: int | None = None):
        self.window = window
        self.real_keys: list[Tensor | None] = [None] * n_layers       # (B, K, T, E), then with the summary key
        self.real_values: list[Tensor | None] = [None] * n_layers
        self.thought_keys: list[list[Tensor]] = [[] for _ in range(n_layers)]    # per pass (B*M, K, T, E)
        self.thought_values: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self.n_thoughts = None                                         # None while the real tokens go in
        self.at = None                                                 # the streams' positions (B*M, K), or all

    def __len__(self) -> int:
        return 0 if self.real_keys[0] is None else self.real_keys[0].shape[2]

    def begin_thoughts(self, n_thoughts: int, at: Tensor | None = None):
        # (B, K, T, E) -> (B*M, K, 1 + T, E'): one small copy per layer for all the thought passes (a copy is cheaper
        # than folding the M thoughts into SDPA's head axis, whose backward slows down with the group size)
        self.n_thoughts = n_thoughts
        self.at = None if at is None else at.repeat_interleave(n_thoughts, dim=0)
        self.real_keys = [with_summary_slot(k).repeat_interleave(n_thoughts, dim=0) for k in self.real_keys]
        self.real_values = [with_summary_slot(v).repeat_interleave(n_thoughts, dim=0) for v in self.real_values]

    def mask(self, offset: int) -> None:
        return None  # the fast path needs no mask: it knows the structure

    def attention(self, layer: int, mask: Tensor | None = None):
        if self.n_thoughts is None:                                    # the real tokens: plain causal
            return lambda q, k, v: attend(q, k, v, mask, self.window)
        real_k, real_v = self.real_keys[layer], self.real_values[layer]
        past_k, past_v = tuple(self.thought_keys[layer]), tuple(self.thought_values[layer])

        def attend_fn(q, k, v):
            return thought_attention(q, [*past_k, k], [*past_v, v], real_k, real_v, self.n_thoughts, self.window,
                                     self.at)
        return attend_fn

    def append(self, layer: int, k: Tensor, v: Tensor):
        if self.n_thoughts is None:
            self.real_keys[layer], self.real_values[layer] = k, v
        else:
            self.thought_keys[layer].append(k)
            self.thought_values[layer].append(v)


def padded_dim(head_dim: int, device: torch.device) -> int:
    """Head dim plus one summary channel, rounded up to a multiple of 8 on a GPU (what its SDPA kernels want) and
    of 2 on the CPU (measured at E = 64, n = 256 and 1024: 66 channels cost 7-9% more than 64, 72 cost 12-16%)."""
    multiple = 2 if device.type == "cpu" else 8
    return (head_dim + 1 + multiple - 1) // multiple * multiple


def with_summary_slot(x: Tensor) -> Tensor:
    """(B, K, T, E) -> (B, K, 1 + T, E'): a summary row in front (1 in channel E, 0 elsewhere), and the
    real rows padded with zeros. Used for keys (score channel) and values (weight channel) alike."""
    B, K, T, E = x.shape
    out = x.new_zeros(B, K, 1 + T, padded_dim(E, x.device))
    out[:, :, 0, E] = 1.0
    out[:, :, 1:, :E] = x
    return out


def thought_attention(q: Tensor, own_k: list[Tensor], own_v: list[Tensor], real_k: Tensor, real_v: Tensor,
                      n_thoughts: int, window: int | None, at: Tensor | None = None) -> Tensor:
    """Attention of one thought pass for all streams: q (B*M, H, T, E) -> (B*M, H, T, E); with streams at
    selected positions only, at (B*M, S), q is (B*M, H, S, E) and so is the result.

    own_k, own_v: each stream's thought tokens so far, one (B*M, K, T or S, E) per pass (the last is this pass's);
    real_k, real_v: (B*M, K, 1 + T, E') from with_summary_slot. Equal to attend() with thought_mask."""
    BM, H, T, E = q.shape                                                      # T: the number of streams
    K, offset = own_k[0].shape[1], len(own_k)
    G, scale = H // K, E ** -0.5

    # (b) each stream's own thought tokens: `offset` dot products per query, no copy of the cached keys
    q_grouped = q.view(BM, K, G, T, E)
    own_scores = torch.stack([upcast((q_grouped * k[:, :, None]).sum(-1)) for k in own_k], dim=-1) * scale
    if window is not None and offset > window:  # the thought token `back` passes ago sits `back` positions back
        back = torch.arange(offset - 1, -1, -1, device=q.device)
        own_scores = own_scores.masked_fill(back >= window, float("-inf"))    # (B*M, K, G, T, offset)
    own_lse = own_scores.logsumexp(dim=-1)                                    # (B*M, K, G, T)
    own_probs = own_scores.softmax(dim=-1).type_as(q)
    own_out = sum(own_probs[..., j, None] * v[:, :, None] for j, v in enumerate(own_v))   # (B*M, K, G, T, E)

    # (a) the real keys through SDPA, with the summary key standing for (b). Query 1+i sees the summary key 0
    # and the real keys 1..1+i: plain causal on the (1+T) x (1+T) grid (row 0 is a dummy query).
    q_aug = torch.cat([q.new_zeros(BM, H, 1, E), q], dim=2)                     # (B*M, H, 1 + T, E)
    score_channel = F.pad(own_lse.reshape(BM, H, T, 1).type_as(q) / scale, (0, 0, 1, 0))  # scale*q.k_summary = lse
    q_aug = torch.cat([q_aug, score_channel, q.new_zeros(BM, H, 1 + T, real_k.shape[-1] - E - 1)], dim=-1)
    # A sliding window (in positions; the query sits at i + offset) cuts real keys j <= i + offset - W.
    real_visible = None
    if at is not None:                          # stream s at position at[s]: row 1+s sees keys 0 and 1+j, j <= at[s]
        j = torch.arange(real_k.shape[2] - 1, device=q.device)
        seen = j <= at[..., None]
        if window is not None:
            seen &= j > at[..., None] + offset - window
        seen = F.pad(seen, (1, 0), value=True)                                  # (B*M, S, 1 + T): the summary key
        real_visible = torch.cat([seen[:, :1], seen], dim=1)[:, None]          # row 0, a dummy query: any row
    elif window is not None and T - 1 + offset >= window:
        i = torch.arange(1 + T, device=q.device)
        real_visible = (i[None, :] <= i[:, None]) & ((i[None, :] > i[:, None] + offset - window) | (i[None, :] == 0))
    out = F.scaled_dot_product_attention(q_aug, real_k, real_v, attn_mask=real_visible,
                                         is_causal=real_visible is None, scale=scale,
                                         enable_gqa=H != K)[:, :, 1:]        # (B*M, H, T, E')
    own_share = out[..., E:E + 1].view(BM, K, G, T, 1)                          # Z_own / (Z_real + Z_own)
    merged = out[..., :E].view(BM, K, G, T, E) + own_share * own_out
    return merged.reshape(BM, H, T, E)


# ---- 2. the LM head's log-prob without the (.., V) logits -----------------------------------------------------

class TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, banned):
        device = h.device.type     # under autocast the matmul runs in bf16; backward repeats that by hand
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        logits = head_logits(h, weight, bias, banned)                        # (.., V), fp32 or fp64
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
        grad = head_logits(h_, weight_, bias_, banned)                       # recomputed: (.., V)
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
