"""A Mistral (and Llama, which is the same model without a sliding window) in plain PyTorch.

    token embedding -> n_layers x [RMSNorm -> attention (RoPE, grouped-query, causal or sliding window)
                                   RMSNorm -> SwiGLU MLP] -> RMSNorm -> LM head (tied or untied)

Module names copy Hugging Face's leaf names, so a state_dict key is a Hugging Face checkpoint's key minus
"model.": machinery/hf_io.py loads such checkpoints (config.json + safetensors + tokenizer.json) without
`transformers`, and tests/test_model.py checks the logits against transformers'.

Shapes: B batch, S new tokens, P cached tokens, D model dim, H query heads, K key/value heads,
E head dim, F MLP dim, V vocabulary.

The seam Quiet-STaR needs: the model never decides where thought tokens go. A caller passes input
embeddings, explicit position ids, a bool mask (True = may attend) and a cache that owns the attention
over earlier keys (see KVCache; qstar.py and fast.py have the caches for parallel thoughts).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attention_mask import causal_mask


@dataclass
class MistralConfig:
    vocab_size: int = 32000
    dim: int = 4096                    # hidden_size
    n_layers: int = 32                 # num_hidden_layers
    n_heads: int = 32                  # num_attention_heads
    n_kv_heads: int = 8                # num_key_value_heads: n_heads // n_kv_heads queries share a K/V head
    head_dim: int = 128                # head_dim (dim // n_heads unless the checkpoint says otherwise)
    ffn_dim: int = 14336               # intermediate_size
    norm_eps: float = 1e-5             # rms_norm_eps
    rope_theta: float = 10000.0        # rope_theta
    sliding_window: int | None = 4096  # sliding_window; None = plain causal (Llama)
    tie_embeddings: bool = False       # tie_word_embeddings: the LM head reuses the embedding matrix
    attention_bias: bool = False       # attention_bias (Llama option; Mistral has none)
    mlp_bias: bool = False             # mlp_bias (Llama option)
    architecture: str = "MistralForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    max_position_embeddings: int = 32768

    @property
    def eos_ids(self) -> list[int]:
        """eos_token_id as a list (HF configs hold an int, a list or null)."""
        eos = self.eos_token_id
        return [] if eos is None else eos if isinstance(eos, list) else [eos]


# ---- building blocks -------------------------------------------------------------------------------

def upcast(x: Tensor) -> Tensor:
    """bf16/fp16 -> fp32 for sums and exponentials; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 (bf16 sums of squares lose precision), then scale in the input dtype, as HF does
        x_normed = F.rms_norm(upcast(x), (x.shape[-1],), eps=self.eps).type_as(x)
        return self.weight * x_normed


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Rotary tables for explicit positions (B, S) -> cos, sin (B, 1, S, E), in fp32 (as HF), or fp64."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq                      # (B, S, E/2)
    angles = torch.cat([angles, angles], dim=-1)                           # (B, S, E): rotate-half layout
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, S, E) in the rotate-half layout that HF checkpoints are stored in (no q/k permute)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).type_as(x)   # in fp32 even for bf16


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, window: int | None = None) -> Tensor:
    """Softmax attention with grouped K/V: q (B, H, S, E), k/v (B, K, P+S, E) -> (B, H, S, E).

    mask: bool, True = may attend, broadcastable to (B, H, S, P+S). None = causal (the S queries are the
    last S of the P+S keys) with the sliding window. SDPA picks a fused kernel (flash on CPU and GPU: no
    S x S matrix is kept) and, with enable_gqa, reads each K/V head for its H // K queries without copies."""
    S, n_keys = q.shape[2], k.shape[2]
    is_causal = mask is None and S == n_keys and (window is None or window >= S)
    if mask is None and not is_causal:
        mask = causal_mask(S, n_keys, window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend_fn) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, S, D) -> (out (B, S, D), k (B, K, S, E), v (B, K, S, E)); the new k, v go to the cache.

        attend_fn(q, k, v) -> (B, H, S, E) decides which keys each query sees (mask and cache)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, S, E)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, S, E)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, S, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend_fn(q, k, v)                                                        # (B, H, S, E)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))           # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend_fn) -> tuple[Tensor, Tensor, Tensor]:
        """A pure function of its inputs (the cache is only read through attend_fn), so it can be
        recomputed by activation checkpointing."""
        attn_out, k, v = self.self_attn(self.input_layernorm(x), cos, sin, attend_fn)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


def run_layers(x: Tensor, cos: Tensor, sin: Tensor, layers, attend_fns) -> tuple[Tensor, ...]:
    """Consecutive decoder layers: -> (x, k_1, v_1, k_2, v_2, ..) with each layer's new keys and values. A pure
    function of its inputs (the caches are only read, through attend_fns), so checkpointing may run it again."""
    keys_values = []
    for layer, attend_fn in zip(layers, attend_fns):
        x, k, v = layer(x, cos, sin, attend_fn)
        keys_values += [k, v]
    return x, *keys_values


# ---- caches: who attends to what --------------------------------------------------------------------

class KVCache:
    """Keys and values of earlier tokens, per layer, grown with torch.cat (kept in the autograd graph).

    attention(layer, mask) returns the function a layer uses to attend over [cached | new] keys. It
    captures the cached tensors as they are now, so a checkpointed layer recomputes the same thing after
    later passes have appended more. With no mask it is causal (with the sliding window)."""

    def __init__(self, n_layers: int, window: int | None = None):
        self.window = window
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def attention(self, layer: int, mask: Tensor | None = None):
        past_k, past_v = self.keys[layer], self.values[layer]

        def attend_fn(q, k, v):
            if past_k is not None:
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, K, P+S, E)
            return attend(q, k, v, mask, window=self.window)
        return attend_fn

    def append(self, layer: int, k: Tensor, v: Tensor):
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v


# ---- the model ------------------------------------------------------------------------------------

class Mistral(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False  # recompute the layers' forward in backward: far less memory, slower
        # With checkpointing, the input of every 2nd layer is kept: half the memory of keeping every layer's input,
        # for the same recomputation (two layers' activations live at a time in backward instead of one).
        self.layers_per_checkpoint = 2

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B, S) -> input embeddings (B, S, D)."""
        return self.embed_tokens(tokens)

    def hidden(self, embeds: Tensor, positions: Tensor | None = None, mask: Tensor | None = None,
               cache=None) -> Tensor:
        """Input embeddings (B, S, D) -> hidden states after the final norm (B, S, D): the LM head's input.

        positions: (B, S) or (S,) position ids; default: after the cached tokens.
        mask: bool (S, P+S) or (B, 1, S, P+S), True = may attend; default: causal with the sliding window.
        cache: a KVCache (or anything with .attention(layer, mask) -> attend_fn and .append(layer, k, v));
               it decides how the new queries see earlier keys and receives this call's keys and values."""
        B, S, _ = embeds.shape
        if positions is None:
            past = len(cache) if cache is not None else 0
            positions = torch.arange(past, past + S, device=embeds.device)
        positions = positions.expand(B, S) if positions.dim() == 1 else positions
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta,
                                torch.promote_types(embeds.dtype, torch.float32))

        def plain_attend(q, k, v):
            return attend(q, k, v, mask, self.config.sliding_window)
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        group = self.layers_per_checkpoint if checkpointing else 1
        x = embeds
        for first in range(0, len(self.layers), group):
            layers = self.layers[first:first + group]
            attend_fns = [cache.attention(i, mask) if cache is not None else plain_attend
                          for i in range(first, first + len(layers))]
            if checkpointing:   # keeps only x; the group's forward runs again in backward
                x, *keys_values = checkpoint(run_layers, x, cos, sin, layers, attend_fns, use_reentrant=False)
            else:
                x, *keys_values = run_layers(x, cos, sin, layers, attend_fns)
            if cache is not None:
                for i, (k, v) in enumerate(zip(keys_values[::2], keys_values[1::2]), start=first):
                    cache.append(i, k, v)
        return self.norm(x)

    def forward(self, tokens: Tensor | None = None, *, embeds: Tensor | None = None,
                positions: Tensor | None = None, mask: Tensor | None = None, cache=None) -> Tensor:
        """tokens (B, S) or embeds (B, S, D) -> logits (B, S, V). See hidden() for the keyword arguments."""
        if (tokens is None) == (embeds is None):
            raise ValueError("pass exactly one of tokens (B, S) ids or embeds (B, S, D)")
        if embeds is None:
            embeds = self.embed(tokens)
        return self.lm_head(self.hidden(embeds, positions, mask, cache))

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layers, self.config.sliding_window)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
