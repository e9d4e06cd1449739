"""Caches for parallel thinking: who each thought token attends to, with and without a dense mask.

Both caches plug into model.hidden(..., cache=...). The first pass fills them with the T real tokens
(causal). After begin_thoughts(M), every further pass adds one thought token per stream: M streams per
real position i (the M thoughts sampled there), each seeing x_0..x_i and its own earlier thought tokens
(attention_mask.thought_mask draws it).

DenseThoughtCache is the official code's way and our readable reference: every pass appends its keys to
one long cache and attends to all of it through a bool mask of shape (T, T * (step + 1)). Time and memory
grow with T^2 * step, and the real keys are copied M times.

ThoughtCache is the fast path. It never builds that mask: a thought query attends
  (a) causally to the T real keys, through SDPA's fused kernel (no T x T matrix is kept), and
  (b) to its own `step` thought keys, a (T, step) score matrix,
and the two softmaxes are merged exactly. The merge needs the log-sum-exp of (b), which we hand to SDPA as
one extra "summary" key: an extra channel gives query i the score lse_i against the summary key, and the
summary value carries a 1 in an extra channel, so SDPA returns, per query,
    out[:E] = Z_real / (Z_real + Z_own) * softmax_real @ V_real        out[E] = Z_own / (Z_real + Z_own)
and the full answer is out[:E] + out[E] * (softmax_own @ V_own). Autograd runs through SDPA as usual.
The M thoughts read the real keys of their text, copied once per layer and step (not once per pass).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_mask import thought_mask
from model import KVCache, attend, upcast


class DenseThoughtCache(KVCache):
    """Reference: one growing KV cache, the real keys repeated for each of the M thoughts."""

    def begin_thoughts(self, n_thoughts: int):
        self.T = len(self)
        self.keys = [k.repeat_interleave(n_thoughts, dim=0) for k in self.keys]       # (B*M, K, T, E)
        self.values = [v.repeat_interleave(n_thoughts, dim=0) for v in self.values]

    def mask(self, step: int) -> Tensor:
        return thought_mask(self.T, step, self.window, device=self.keys[0].device)


class ThoughtCache:
    """Fast path: real keys (B, K, T, E) from the base pass, thought keys per step (B*M, K, T, E), no
    T x T*step mask and no concatenated cache: each pass reads the earlier steps' keys where they are."""

    def __init__(self, n_layers: int, window: int | None = None):
        self.window = window
        self.real_keys: list[Tensor | None] = [None] * n_layers       # (B, K, T, E), then with the summary key
        self.real_values: list[Tensor | None] = [None] * n_layers
        self.thought_keys: list[list[Tensor]] = [[] for _ in range(n_layers)]    # per step (B*M, K, T, E)
        self.thought_values: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self.n_thoughts = None                                         # None while the real tokens go in

    def __len__(self) -> int:
        return 0 if self.real_keys[0] is None else self.real_keys[0].shape[2]

    def begin_thoughts(self, n_thoughts: int):
        # (B, K, T, E) -> (B*M, K, 1 + T, E'): one small copy per layer for the whole step (a copy is cheaper
        # than folding the M thoughts into SDPA's head axis, whose backward slows down with the group size)
        self.n_thoughts = n_thoughts
        self.real_keys = [with_summary_slot(k).repeat_interleave(n_thoughts, dim=0) for k in self.real_keys]
        self.real_values = [with_summary_slot(v).repeat_interleave(n_thoughts, dim=0) for v in self.real_values]

    def mask(self, step: int) -> None:
        return None  # the fast path needs no mask: it knows the structure

    def attention(self, layer: int, mask: Tensor | None = None):
        if self.n_thoughts is None:                                    # the real tokens: plain causal
            return lambda q, k, v: attend(q, k, v, mask, self.window)
        real_k, real_v = self.real_keys[layer], self.real_values[layer]
        past_k, past_v = tuple(self.thought_keys[layer]), tuple(self.thought_values[layer])

        def attend_fn(q, k, v):
            return thought_attention(q, [*past_k, k], [*past_v, v], real_k, real_v, self.n_thoughts, self.window)
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
                      n_thoughts: int, window: int | None) -> Tensor:
    """Attention of one thought step for all streams: q (B*M, H, T, E) -> (B*M, H, T, E).

    own_k, own_v: each stream's thought tokens so far, one (B*M, K, T, E) per step (the last is this step's);
    real_k, real_v: (B*M, K, 1 + T, E') from with_summary_slot. Equal to attend() with thought_mask."""
    BM, H, T, E = q.shape
    K, step = own_k[0].shape[1], len(own_k)
    G, scale = H // K, E ** -0.5

    # (b) each stream's own thought tokens: `step` dot products per query, no copy of the cached keys
    q_grouped = q.view(BM, K, G, T, E)
    own_scores = torch.stack([upcast((q_grouped * k[:, :, None]).sum(-1)) for k in own_k], dim=-1) * scale
    if window is not None and step > window:  # the thought token `back` steps ago sits `back` positions back
        back = torch.arange(step - 1, -1, -1, device=q.device)
        own_scores = own_scores.masked_fill(back >= window, float("-inf"))    # (B*M, K, G, T, step)
    own_lse = own_scores.logsumexp(dim=-1)                                    # (B*M, K, G, T)
    own_probs = own_scores.softmax(dim=-1).type_as(q)
    own_out = sum(own_probs[..., j, None] * v[:, :, None] for j, v in enumerate(own_v))   # (B*M, K, G, T, E)

    # (a) the real keys through SDPA, with the summary key standing for (b). Query 1+i sees the summary key 0
    # and the real keys 1..1+i: plain causal on the (1+T) x (1+T) grid (row 0 is a dummy query).
    q_aug = torch.cat([q.new_zeros(BM, H, 1, E), q], dim=2)                     # (B*M, H, 1 + T, E)
    score_channel = F.pad(own_lse.reshape(BM, H, T, 1).type_as(q) / scale, (0, 0, 1, 0))  # scale*q.k_summary = lse
    q_aug = torch.cat([q_aug, score_channel, q.new_zeros(BM, H, 1 + T, real_k.shape[-1] - E - 1)], dim=-1)
    # A sliding window (in positions; the query sits at i + step) cuts real keys j <= i + step - W.
    real_visible = None
    if window is not None and T - 1 + step >= window:
        i = torch.arange(1 + T, device=q.device)
        real_visible = (i[None, :] <= i[:, None]) & ((i[None, :] > i[:, None] + step - window) | (i[None, :] == 0))
    out = F.scaled_dot_product_attention(q_aug, real_k, real_v, attn_mask=real_visible,
                                         is_causal=real_visible is None, scale=scale,
                                         enable_gqa=H != K)[:, :, 1:]        # (B*M, H, T, E')
    own_share = out[..., E:E + 1].view(BM, K, G, T, 1)                          # Z_own / (Z_real + Z_own)
    merged = out[..., :E].view(BM, K, G, T, E) + own_share * own_out
    return merged.reshape(BM, H, T, E)
