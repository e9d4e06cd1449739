"""Attention masks for plain decoding and for parallel thoughts, as pure functions.

Every mask is a bool tensor, True = the query may attend to the key. Rows are queries, columns are keys.
These are the readable reference: the fast path (fast.ThoughtCache) never builds them, and the
tests prove the two agree.

Position convention for thoughts (one thought stream per real position i, all streams in parallel):
    real token x_i                    position i
    thought pass at offset 1, 2, ...  position i + offset (<start> is offset 1, c_j offset 1 + j, <end>
                                                           offset L + 2, then the teacher-forced true tokens)
So every stream reads exactly like the text "x_0 ... x_i <start> c_1 ... c_L <end> x_{i+1} ..." with
consecutive positions, and the sliding window (counted in positions, as in Hugging Face's Mistral: a query
at position p sees keys at positions p - W < q <= p) applies to real and thought keys alike.
"""

import torch
from torch import Tensor


def causal_mask(n_queries: int, n_keys: int | None = None, window: int | None = None,
                device=None) -> Tensor:
    """Causal mask, (n_queries, n_keys); the queries are the last n_queries of the n_keys tokens.

    Query i (at position n_keys - n_queries + i) sees keys j with p - W < j <= p. T=5, W=3:
        1 . . . .
        1 1 . . .
        1 1 1 . .
        . 1 1 1 .
        . . 1 1 1
    With n_keys > n_queries (decoding with a KV cache) the drawing is the bottom rows of the square one.
    """
    n_keys = n_queries if n_keys is None else n_keys
    q = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]   # query positions (Q, 1)
    k = torch.arange(n_keys, device=device)[None, :]                        # key positions   (1, K)
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def thought_mask(T: int, offset: int, window: int | None = None, device=None, at: Tensor | None = None) -> Tensor:
    """Mask for the thought pass at `offset` (>= 1) of all streams at once, over every key computed so far.

    One stream per real position i (at = None), or per selected position at[b, k] (at (B, K): thinking only
    where it may help). Keys are [T real tokens | pass 1 | ... | pass `offset`], each pass one key per stream;
    returns (T, T * (offset + 1)), or (B, 1, K, T + K * offset) with `at`. Query i is stream i's token at
    position i + offset. T=3, offset=2:
              real   pass1  pass2
        s0    1 . .  1 . .  1 . .
        s1    1 1 .  . 1 .  . 1 .
        s2    1 1 1  . . 1  . . 1
    Stream i sees the real prefix x_0..x_i and only its own earlier thought tokens (the diagonal of each
    thought block). With a window W the query sits at position i + offset, so it loses real keys j <= i +
    offset - W and its own thought tokens more than W - 1 passes back. T=4, offset=2, W=3:
              real     pass1    pass2
        s0    1 . . .  1 . . .  1 . . .
        s1    . 1 . .  . 1 . .  . 1 . .
        s2    . . 1 .  . . 1 .  . . 1 .
        s3    . . . 1  . . . 1  . . . 1
    Streams at selected positions only, at = [[1, 3]], T=4, offset=1: the same rows, s1 and s3, of the full mask
              real     pass1
        s1    1 1 . .  1 .
        s3    1 1 1 1  . 1
    """
    i = torch.arange(T, device=device)
    stream = i if at is None else at                                        # (K,) or (B, K): each stream's position
    real = i <= stream[..., None]                                           # causal over real keys
    if window is not None:
        real &= i > stream[..., None] + offset - window
    eye = torch.eye(stream.shape[-1], dtype=torch.bool, device=device).expand(*stream.shape, -1)
    blocks = [real]
    for p in range(1, offset + 1):                                          # own token of pass p
        visible = window is None or offset - p < window
        blocks.append(eye if visible else torch.zeros_like(eye))
    mask = torch.cat(blocks, dim=-1)
    return mask if at is None else mask[:, None]                           # (B, 1, K, keys): one for all heads


def thought_positions(T: int, offset: int, device=None, at: Tensor | None = None) -> Tensor:
    """Position ids of the streams' tokens in the thought pass at `offset`: (T,) = [offset, 1 + offset, ...],
    or at + offset (B, K) for streams at selected positions."""
    return (torch.arange(T, device=device) if at is None else at) + offset
