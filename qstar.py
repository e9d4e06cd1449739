"""Quiet-STaR: think before every token, talk through a mixing head, learn the thoughts with REINFORCE.

Paper: Zelikman et al. 2024, "Quiet-STaR: Language Models Can Teach Themselves to Think Before Speaking"
(arXiv 2403.09629). At every position i of a text, all at once:
  1. think  - sample a thought <start> c_1 .. c_L <end> after x_0..x_i (one decoder pass per thought token,
              for all T positions in parallel; thought_cache.py / attention_mask.py say who sees what);
  2. talk   - after <end>, teacher-force the next true tokens; a mixing head interpolates each prediction
              after the thought with the base prediction that has the same target;
  3. learn  - NLL of the base and the mixed predictions, plus REINFORCE on the thought tokens with
              reward = log-likelihood of the next n_true true tokens after the thought, baseline = the mean
              over the thoughts sampled at the same position.

Shapes: B batch, T tokens, M thoughts per position, L thought length (sampled tokens), N true tokens
scored after a thought (n_true), D model dim, V vocabulary. Rows of size B*M hold thought m of text b at
row b*M + m.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model import Mistral, load_pretrained, save_pretrained
from thought_cache import DenseThoughtCache, ThoughtCache

QUIETSTAR_WEIGHTS, QUIETSTAR_CONFIG = "quietstar.safetensors", "quietstar.json"


@dataclass
class QuietStarConfig:
    # the thought                                  (official name in the authors' code, value there)
    thought_len: int = 9               # L sampled thought tokens between <start> and <end> (n_ahead = L + 3: 12)
    n_true: int = 4                    # N true tokens scored after each thought: non-myopic (n_ahead_talk: 4)
    n_thoughts: int = 2                # M thoughts per position; their mean reward is the baseline (n_passes: 2)
    thought_temperature: float = 1.0   # sampling temperature of thought tokens (always 1 in effect, see README)
    # the loss
    base_loss_weight: float = 0.5      # weight of the no-thought NLL; the talk NLLs share the rest (original_loss_weight: 0.5)
    policy_weight: float = 1.0         # REINFORCE term weight; 1e6 there makes it swamp the NLL (policy_loss_beta: 1e6)
    clip_negative_advantage: bool = True  # advantages below 0 become 0: only better-than-average thoughts are reinforced (remove_negative_rewards: True)
    reinforce_temperature: float | None = None  # temperature of the log-probs in REINFORCE; None = the sampling one, so
                                               # the gradient is the true policy gradient (reinforce_temperature: 3)
    # the markers and the mixing head
    marker_grad_scale: float = 100.0   # markers are stored / this and used * this: their step is this much larger (embedding_scale: 100)
    marker_init: str = ""              # text of the single token whose embedding starts both markers; "" = em dash or "---"
    mixing_hidden: int | None = None   # hidden width of the mixing MLP; None = model dim (talk head: d)
    # speed and memory (results are the same either way; tests prove it)
    fast_attention: bool = True        # thought_cache.ThoughtCache; False = dense masks (the official way)
    activation_checkpointing: bool = False  # recompute layers and LM-head log-probs in backward: ~1/3 slower, far less memory


class ThoughtMarkers(nn.Module):
    """The learned <start> and <end> input embeddings: own parameters, outside the vocabulary, so the LM
    head can never emit them. Stored divided by `grad_scale` and used multiplied by it, so with SGD they
    move grad_scale^2 and with Adam grad_scale times faster than a weight of the same size."""

    def __init__(self, init: Tensor, grad_scale: float):
        super().__init__()
        self.grad_scale = grad_scale
        self.scaled = nn.Parameter(init.detach().float().repeat(2, 1) / grad_scale)  # (2, D): start, end
        self.register_buffer("initial", init.detach().float().clone())          # (D,): for marker_drift()

    def forward(self) -> tuple[Tensor, Tensor]:
        start, end = self.scaled * self.grad_scale
        return start, end

    @torch.no_grad()
    def drift(self) -> tuple[float, float]:
        """How far <start> and <end> moved from their initial embedding, relative to its size."""
        start, end = self()
        size = self.initial.norm()
        return ((start - self.initial).norm() / size).item(), ((end - self.initial).norm() / size).item()


class MixingHead(nn.Module):
    """[h_base ; h_thought] (..., 2D) -> mixing weight (..., 1), a shallow MLP as in the official code.

    The last layer starts at zero, so the weight is exactly 0 and the mixed prediction equals the base one
    until training finds thoughts that help. The output is not squashed (a sigmoid could not start at 0)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1, bias=False))
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, h_base: Tensor, h_thought: Tensor) -> Tensor:
        return self.net(torch.cat([h_base, h_thought], dim=-1).to(self.net[0].weight.dtype)).type_as(h_base)


def mix(h_base: Tensor, h_thought: Tensor, weight: Tensor) -> Tensor:
    """(1 - w) h_base + w h_thought. The LM head is linear, so this equals mixing the two logits."""
    return h_base + weight * (h_thought - h_base)


def sample_from_logits(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw from softmax(logits) per row: (.., V) -> (..). Inverse-CDF sampling: one uniform number
    per row instead of torch.multinomial's V exponential ones (the slowest op of a thought pass)."""
    cdf = (logits - logits.amax(dim=-1, keepdim=True)).exp().cumsum(dim=-1)        # (.., V), increasing
    u = torch.rand(*logits.shape[:-1], 1, device=logits.device, generator=generator) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True)[..., 0].clamp(max=logits.shape[-1] - 1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def reinforce_loss(reward: Tensor, thought_logp: Tensor, valid: Tensor, clip_negative: bool) -> Tensor:
    """REINFORCE with the mean over the M thoughts at each position as the baseline.

    reward: (B, M, T) log-likelihood gain of the true tokens after each thought; thought_logp: (B, M, T)
    log-probability of each sampled thought (sum over its tokens); valid: (B, 1, T) positions that count.
    Returns -mean(advantage * thought_logp) over valid positions; the advantage carries no gradient.
    With a single thought per position (M = 1) the mean would equal the reward and the gradient would vanish;
    then, as in the official code, the advantage is the reward itself (the gain over no thought)."""
    advantage = reward - reward.mean(dim=1, keepdim=True) if reward.shape[1] > 1 else reward
    if clip_negative:
        advantage = advantage.clamp(min=0)
    return masked_mean(advantage.detach() * -thought_logp, valid.expand_as(thought_logp))


def pick_marker_token(tokenizer) -> tuple[str, int]:
    """The first of em dash, ' em dash', '---', ' ---' that the tokenizer keeps as one (known) token."""
    for text in ("\u2014", " \u2014", "---", " ---"):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) == 1 and tokenizer.decode(ids).strip() == text.strip():   # not the unknown token
            return text, ids[0]
    raise ValueError("the tokenizer has no single token for an em dash or '---'; set marker_init to the "
                     "text of some single token to start the thought markers from")


class QuietStar(nn.Module):
    """A Mistral that thinks. QuietStar(model, config, tokenizer)(tokens) -> dict of loss parts."""

    def __init__(self, model: Mistral, config: QuietStarConfig | None = None, tokenizer=None):
        super().__init__()
        self.model, self.config = model, config or QuietStarConfig()
        cfg, dim = self.config, model.config.dim
        if cfg.marker_init:
            ids = tokenizer.encode(cfg.marker_init, add_special_tokens=False).ids if tokenizer else []
            if len(ids) != 1:
                raise ValueError(f"marker_init {cfg.marker_init!r} is {len(ids)} tokens; it must be exactly one")
            marker_id = ids[0]
        elif tokenizer is not None:
            cfg.marker_init, marker_id = pick_marker_token(tokenizer)
        else:
            raise ValueError("pass the tokenizer (or config.marker_init) to choose the markers' initial token")
        device = model.embed_tokens.weight.device
        with torch.no_grad():
            init = model.embed_tokens.weight[marker_id].float()
        self.markers = ThoughtMarkers(init, cfg.marker_grad_scale).to(device)
        self.mixing_head = MixingHead(dim, cfg.mixing_hidden or dim).to(device)
        model.activation_checkpointing = cfg.activation_checkpointing
        # A thought is text: EOS and the tokenizer's special tokens (chat roles, file separators) are never sampled.
        banned = set(model.config.eos_ids)
        if tokenizer is not None:
            banned |= {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        banned = sorted(i for i in banned if i < model.config.vocab_size)
        self.register_buffer("banned_thought_ids", torch.tensor(banned, dtype=torch.long, device=device),
                             persistent=False)

    def marker_embeddings(self) -> tuple[Tensor, Tensor]:
        """(start, end), each (D,): the input vectors exactly as the model sees them."""
        start, end = self.markers()
        dtype = self.model.embed_tokens.weight.dtype
        return start.to(dtype), end.to(dtype)

    # ---- one decoder pass for all positions, and the LM head on top ---------------------------------

    def _new_cache(self):
        cache_class = ThoughtCache if self.config.fast_attention else DenseThoughtCache
        return cache_class(self.model.config.n_layers, self.model.config.sliding_window)

    def _embed(self, ids: Tensor) -> Tensor:
        """Embeddings of thought and teacher-forced tokens, with a sparse gradient: each of the many lookups
        per step would otherwise write a dense (V, D) gradient (a 113 MB memset per pass for SmolLM2). The
        base pass's dense lookup keeps the summed gradient dense for the optimizer."""
        return F.embedding(ids, self.model.embed_tokens.weight, sparse=torch.is_grad_enabled())

    def _pass(self, embeds: Tensor, step: int, cache) -> Tensor:
        """Thought step `step` of every stream: embeds (B*M, T, D) at positions i + step -> hidden (B*M, T, D)."""
        T = embeds.shape[1]
        positions = torch.arange(step, step + T, device=embeds.device)
        return self.model.hidden(embeds, positions, mask=cache.mask(step), cache=cache)

    def _head_logp(self, h: Tensor, targets: Tensor | None, temperature: float,
                   sample_temperature: float | None = None, h_base: Tensor | None = None):
        """log softmax(lm_head(h) / temperature)[targets] -> (logp (..), targets (..), mix weight or None).

        targets None: sample them from softmax(logits / sample_temperature) (no gradient through the choice).
        h_base given: first mix h with it through the mixing head (the talk predictions).
        With activation checkpointing the (.., V) logits are recomputed in backward instead of kept; the
        preserved RNG state makes the recomputation draw the same sample."""
        def head(h, h_base, targets):
            weight = None
            if h_base is not None:
                weight = self.mixing_head(h_base, h)
                h = mix(h_base, h, weight)
            logits = self.model.lm_head(h).float()                                    # (.., V)
            if sample_temperature is not None:                                        # a thought token
                logits = logits.index_fill(-1, self.banned_thought_ids, float("-inf"))
            logp_all = (logits if temperature == 1 else logits / temperature).log_softmax(dim=-1)
            if targets is None:
                unnormalised = (logp_all if sample_temperature == temperature else
                                logits / sample_temperature).detach()
                targets = sample_from_logits(unnormalised)
            return logp_all.gather(-1, targets[..., None])[..., 0], targets, weight
        if self.config.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(head, h, h_base, targets, use_reentrant=False)
        return head(h, h_base, targets)

    # ---- think and talk -----------------------------------------------------------------------------

    def _base_pass(self, tokens: Tensor):
        """The plain causal pass over the real tokens, shared by all M thoughts. -> (hidden (B, T, D), cache)."""
        cache = self._new_cache()
        return self.model.hidden(self.model.embed(tokens), torch.arange(tokens.shape[1], device=tokens.device),
                                 cache=cache), cache

    def _think(self, tokens: Tensor, cache, n_thoughts: int, thought_ids: Tensor | None = None):
        """Steps 1 .. L+1: <start>, then c_1 .. c_L, one pass each, for all B*M streams at once.

        thought_ids (B*M, T, L) or None to sample them. Returns (thought ids (B*M, T, L), their summed
        log-probs at the REINFORCE temperature (B*M, T)); afterwards the cache holds the whole thought."""
        cfg = self.config
        BM, T = tokens.shape[0] * n_thoughts, tokens.shape[1]
        start, _ = self.marker_embeddings()
        x = start.expand(BM, T, -1)                                              # (B*M, T, D)
        cache.begin_thoughts(n_thoughts)
        ids, logp_sum = [], 0.0
        for j in range(cfg.thought_len + 1):
            h = self._pass(x, step=1 + j, cache=cache)                            # input: <start> or c_j
            if j == cfg.thought_len:
                break                                                             # c_L only fills the cache
            given = thought_ids[..., j] if thought_ids is not None else None
            logp, c, _ = self._head_logp(h, given, cfg.reinforce_temperature or cfg.thought_temperature,
                                         sample_temperature=cfg.thought_temperature)
            ids.append(c)
            logp_sum = logp_sum + logp
            x = self._embed(c)
        empty = tokens.new_zeros(BM, T, 0)
        return (torch.stack(ids, dim=-1) if ids else empty), logp_sum

    def _talk(self, tokens: Tensor, h_base: Tensor, cache, n_thoughts: int, n_true: int):
        """Steps L+2 ..: <end>, then the true tokens x_{i+1} .. x_{i+N-1}, teacher-forced.

        Pass u predicts x_{i+1+u}, mixed with the base state h_base_{i+u} that predicts the same token.
        Returns, for u = 0 .. N-1, (log-prob of x_{i+1+u} (B*M, T-1-u), mixing weight (B*M, T-1-u))."""
        T, step = tokens.shape[1], self.config.thought_len + 2
        rows = tokens.repeat_interleave(n_thoughts, dim=0)                       # (B*M, T)
        h_base = h_base.repeat_interleave(n_thoughts, dim=0)                     # (B*M, T, D)
        _, end = self.marker_embeddings()
        x = end.expand(rows.shape[0], T, -1)
        out = []
        for u in range(min(n_true, T - 1)):
            h = self._pass(x, step + u, cache)                                    # (B*M, T, D)
            logp, _, weight = self._head_logp(h[:, :T - 1 - u], rows[:, 1 + u:], 1.0, h_base=h_base[:, u:T - 1])
            out.append((logp, weight[..., 0]))
            if u + 1 < min(n_true, T - 1):  # next input at position i: the true token x_{i+1+u} (dummy past the end)
                x = self._embed(F.pad(rows[:, 1 + u:], (0, 1 + u)))
        return out

    def forward(self, tokens: Tensor, loss_mask: Tensor | None = None, think: bool = True) -> dict[str, Tensor]:
        """tokens (B, T) -> {loss, policy_term, nll_base, nll_thought, nll_talk, reinforce, reward_mean,
        mix_weight_mean}; policy_term = policy_weight * reinforce is the part of loss that REINFORCE adds.

        loss_mask (B, T): False for padding; a token that is False is never a target. Documents packed into
        one window are separated by EOS: a thought is never scored on the tokens of the next document.
        think=False: plain next-token training, {loss = nll_base, nll_base} (no thought passes at all)."""
        cfg, (B, T) = self.config, tokens.shape
        M = cfg.n_thoughts
        target_ok = (loss_mask if loss_mask is not None else torch.ones_like(tokens, dtype=torch.bool))[:, 1:]
        # document index of every token: x_{i+1+u} is scored after the thought at i only if no EOS lies in
        # x_{i+1} .. x_{i+u} (predicting the EOS itself is fine; the token after it is another document)
        eos = torch.tensor(self.model.config.eos_ids, dtype=tokens.dtype, device=tokens.device)
        doc = torch.isin(tokens, eos).cumsum(dim=1)                                # (B, T)
        # 1. base pass, no thoughts
        h_base, cache = self._base_pass(tokens)
        logp_base, _, _ = self._head_logp(h_base[:, :-1], tokens[:, 1:], 1.0)     # (B, T-1)
        nll_base = masked_mean(-logp_base, target_ok)
        if not think:
            return {"loss": nll_base, "nll_base": nll_base.detach()}
        # 2. think: one thought per stream, M streams per position
        _, thought_logp = self._think(tokens, cache, M)                           # (B*M, T)
        # 3. talk: <end>, then the next N true tokens, each mixed with its base prediction
        talk = self._talk(tokens, h_base, cache, M, cfg.n_true)
        # 4. losses. Reward of a thought: sum over u of log p_mixed(x_{i+1+u}) - log p_base(x_{i+1+u})
        base_rows = logp_base.detach().repeat_interleave(M, dim=0)
        reward = torch.zeros(B * M, T, device=tokens.device)
        nll_talk = []
        for u, (logp, _) in enumerate(talk):
            ok = (target_ok[:, u:] & (doc[:, u:T - 1] == doc[:, :T - 1 - u])).repeat_interleave(M, dim=0)
            nll_talk.append(masked_mean(-logp, ok))
            reward[:, :T - 1 - u] += ((logp - base_rows[:, u:]) * ok).detach()
        nll_talk = torch.stack(nll_talk).mean()
        valid = F.pad(target_ok, (0, 1)).view(B, 1, T)                          # positions with a next token
        reinforce = reinforce_loss(reward.view(B, M, T), thought_logp.view(B, M, T), valid,
                                   cfg.clip_negative_advantage)
        policy_term = cfg.policy_weight * reinforce
        loss = cfg.base_loss_weight * nll_base + (1 - cfg.base_loss_weight) * nll_talk + policy_term
        valid_rows = valid.expand(B, M, T).reshape(B * M, T)
        ok_rows = target_ok.repeat_interleave(M, dim=0)
        return {
            "loss": loss,
            "policy_term": policy_term,
            "nll_base": nll_base.detach(),                                        # next token, no thought
            "nll_thought": masked_mean(-talk[0][0], ok_rows).detach(),            # next token, after a thought
            "nll_talk": nll_talk.detach(),                                        # mean over the N true tokens
            "reinforce": reinforce.detach(),
            "reward_mean": masked_mean(reward, valid_rows),
            "mix_weight_mean": masked_mean(talk[0][1], ok_rows).detach(),
        }

    # ---- public helpers: sampling, fixed thoughts, per-token scores -------------------------------------

    @torch.no_grad()
    def sample_thoughts(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) -> one sampled thought per position, ids (B, T, L)."""
        _, cache = self._base_pass(tokens)
        return self._think(tokens, cache, 1)[0]

    def _end_hidden(self, tokens: Tensor, thought_ids: Tensor | None):
        """One thought per position, up to <end>: -> h_base, h_end (B, T, D) and the thought ids (B, T, L)."""
        h_base, cache = self._base_pass(tokens)
        ids, _ = self._think(tokens, cache, 1, thought_ids)
        _, end = self.marker_embeddings()
        return h_base, self._pass(end.expand(*tokens.shape, -1), self.config.thought_len + 2, cache), ids

    def thought_logits(self, tokens: Tensor, thought_ids: Tensor) -> Tensor:
        """tokens (B, T), thought_ids (B, T, L) -> LM-head logits (B, T, V) of the hidden state at <end>
        (before mixing): what each position predicts for x_{i+1} right after its own thought."""
        if thought_ids.shape != (*tokens.shape, self.config.thought_len):
            raise ValueError(f"thought_ids must be (B, T, thought_len) = {(*tokens.shape, self.config.thought_len)}, "
                             f"got {tuple(thought_ids.shape)}")
        return self.model.lm_head(self._end_hidden(tokens, thought_ids)[1])

    @torch.no_grad()
    def predict(self, tokens: Tensor, thought_ids: Tensor | None = None) -> dict[str, Tensor]:
        """What every position i predicts for x_{i+1}, without and with a thought (one sampled per position).

        -> h_base, h_mixed (B, T, D): LM-head inputs (apply self.model.lm_head for logits);
           mix_weight (B, T); thought_ids (B, T, L)."""
        h_base, h_end, ids = self._end_hidden(tokens, thought_ids)
        weight = self.mixing_head(h_base, h_end)
        return {"h_base": h_base, "h_mixed": mix(h_base, h_end, weight), "mix_weight": weight[..., 0],
                "thought_ids": ids}

    @torch.no_grad()
    def token_scores(self, tokens: Tensor, thought_ids: Tensor | None = None) -> dict[str, Tensor]:
        """Per-token view, for evaluation and the thoughts page: nll_base and nll_thought (B, T-1), the NLL
        of x_{i+1} without / after the thought at i; mix_weight (B, T-1); thought_ids (B, T, L)."""
        p = self.predict(tokens, thought_ids)
        targets = tokens[:, 1:, None]
        nll = {name: -self.model.lm_head(p[h][:, :-1]).float().log_softmax(-1).gather(-1, targets)[..., 0]
               for name, h in (("nll_base", "h_base"), ("nll_thought", "h_mixed"))}
        return nll | {"mix_weight": p["mix_weight"][:, :-1], "thought_ids": p["thought_ids"]}

    # ---- saving and loading ---------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | Path, tokenizer, model_state: dict | None = None):
        """The base model in the Hugging Face layout plus quietstar.safetensors (markers, mixing head)
        and quietstar.json (this config) beside it. model_state: the base weights to write, if not
        self.model.state_dict() (LoRA: merged)."""
        from safetensors.torch import save_file
        out_dir = Path(out_dir)
        save_pretrained(self.model, tokenizer, out_dir, model_state)
        parts = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("model.")}
        save_file(parts, out_dir / QUIETSTAR_WEIGHTS, metadata={"format": "pt"})
        (out_dir / QUIETSTAR_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=torch.float32, device="cpu", **overrides):
        """Load a model saved by save_pretrained; the trained markers and mixing head are kept as saved
        (never re-initialised). A plain Hugging Face folder gives fresh markers and a zero mixing head."""
        from safetensors.torch import load_file
        model, tokenizer = load_pretrained(path, dtype=dtype, device=device)
        config_file = Path(path) / QUIETSTAR_CONFIG
        saved = json.loads(config_file.read_text()) if config_file.exists() else {}
        known = {f.name for f in fields(QuietStarConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown QuietStarConfig fields {sorted(unknown)}; valid: {sorted(known)}")
        qs = cls(model, QuietStarConfig(**{k: v for k, v in saved.items() if k in known} | overrides), tokenizer)
        weights = Path(path) / QUIETSTAR_WEIGHTS
        if weights.exists():
            qs.load_state_dict(load_file(weights, device=str(device)), strict=False)
        return qs, tokenizer
