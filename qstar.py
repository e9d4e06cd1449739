"""Quiet-STaR: think before every token, talk through a mixing head, learn the thoughts with REINFORCE.

Paper: Zelikman et al. 2024, "Quiet-STaR: Language Models Can Teach Themselves to Think Before Speaking"
(arXiv 2403.09629). QuietStar.forward does five steps, for every position i of a text at once:
  1. base pass - one plain causal pass over the text: the no-thought prediction of x_{i+1}, and the keys and
                 values every thought attends to;
  2. think     - <start>, then L sampled thought tokens c_1 .. c_L after x_0 .. x_i: one decoder pass per
                 thought token for all T positions together (attention_mask.py draws who sees what);
  3. talk      - <end>, then the next N true tokens teacher-forced; a mixing head blends each post-thought
                 prediction with the base prediction of the same token;
  4. reward    - how much the thought raised log p(x_{i+1} .. x_{i+N}) over no thought; the baseline is the mean
                 over the M thoughts sampled at the same position (thought_rewards, advantages);
  5. learn     - NLL of the base and the mixed predictions, plus REINFORCE on the thought tokens
                 (reinforce_loss). The README's walk-through and the docstrings below use the same numbers.

Shapes: B batch, T tokens, M thoughts per position (n_thoughts), L thought length (thought_len), N true tokens
scored after a thought (n_true), D model width, V vocabulary. Rows of size B*M hold thought m of text b at
row b*M + m. One stream (text position i with one of its thoughts) takes these positions:

    x_0 .. x_i | <start>  c_1    ..  c_L     <end>    x_{i+1}  ..  x_{i+N-1}
    0   .. i   | i+1      i+2    ..  i+1+L   i+L+2    i+L+3    ..  i+L+1+N
               | offset 1 offset 2 .. L+1    L+2      L+3      ..  L+1+N

A thought pass at `offset` runs one token of every stream at once, at positions i + offset (i = 0 .. T-1), or
only at chosen positions `at` (B, K) (research/levers.py chooses them): the same passes, K streams instead of T.

Everything here is the plain computation, the one to read and step through: a dense attention mask, log_softmax
and gather, sampling in plain sight. fast.py holds equal, faster twins (tests/test_qstar.py proves them equal)
and fast.use(qs) swaps them in (train.py does with --fast).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_mask import thought_mask, thought_positions
from model import KVCache, Mistral, upcast


@dataclass
class QuietStarConfig:
    # the thought                                  (official name in the authors' code, value there)
    thought_len: int = 9               # L sampled thought tokens between <start> and <end> (n_ahead = L + 3: 12)
    n_true: int = 4                    # N true tokens scored after each thought: non-myopic (n_ahead_talk: 4)
    n_thoughts: int = 2                # M thoughts per position; their mean reward is the baseline (n_passes: 2)
    thought_temperature: float = 1.0   # sampling temperature of thought tokens (gumbel_temperature: no effect there, so 1)
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
    # memory (results are the same either way; tests prove it). The fast twins: fast.use(qs)
    activation_checkpointing: bool = False  # keep every 2nd layer's input, recompute the rest in backward: slower, far less memory

    def __post_init__(self):
        for name in ("thought_len", "n_true", "n_thoughts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("thought_temperature", "marker_grad_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.reinforce_temperature is not None and not self.reinforce_temperature > 0:
            raise ValueError(f"--reinforce_temperature must be positive or None, got {self.reinforce_temperature}")
        if not 0 <= self.base_loss_weight <= 1:
            raise ValueError(f"--base_loss_weight must be between 0 and 1, got {self.base_loss_weight}")
        if self.policy_weight < 0:
            raise ValueError(f"--policy_weight must be 0 or more, got {self.policy_weight}")
        if self.mixing_hidden is not None and self.mixing_hidden < 1:
            raise ValueError(f"--mixing_hidden must be at least 1 or None, got {self.mixing_hidden}")


class ThoughtMarkers(nn.Module):
    """The learned <start> and <end> input embeddings: own parameters, outside the vocabulary, so the LM
    head can never emit them. Both start as the embedding of an em dash (or "---"): a token that already means
    "an aside begins / ends here" to a pretrained model, so the first thoughts read as asides, not noise.
    Stored divided by `grad_scale` (100) and used multiplied by it: the paper wants the markers to learn much
    faster than the rest of the model, and with Adam, whose step is ~lr per stored coordinate whatever the
    gradient's size, this makes their step grad_scale times larger in embedding space (grad_scale^2 with SGD)."""

    def __init__(self, init: Tensor, grad_scale: float):
        super().__init__()
        self.grad_scale = grad_scale
        self.stored = nn.Parameter(init.detach().float().repeat(2, 1) / grad_scale)  # (2, D): start, end
        self.register_buffer("initial", init.detach().float().clone())          # (D,): for marker_drift()

    def forward(self) -> tuple[Tensor, Tensor]:
        start, end = self.stored * self.grad_scale
        return start, end

    @torch.no_grad()
    def drift(self, stored: Tensor | None = None) -> tuple[float, float]:
        """How far <start> and <end> moved from their initial embedding, relative to its size. stored: the
        full stored markers where self.stored is a shard (FSDP; machinery/parallel.py gathers them)."""
        start, end = (self.stored if stored is None else stored) * self.grad_scale
        size = self.initial.norm()
        return ((start - self.initial).norm() / size).item(), ((end - self.initial).norm() / size).item()


class MixingHead(nn.Module):
    """[h_base ; h_thought] (..., 2D) -> mixing weight (..., 1), a shallow MLP as in the official code.

    The last layer starts at zero, so the weight is exactly 0 and the mixed prediction equals the base one
    until training finds thoughts that help. As in the official code it is not squashed, so it can go negative
    (it does here, and then a better thought lowers the reward)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1, bias=False))
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, h_base: Tensor, h_thought: Tensor) -> Tensor:
        z = self.net(torch.cat([h_base, h_thought], dim=-1).to(self.net[0].weight.dtype))
        return z.type_as(h_base)


def mix(h_base: Tensor, h_thought: Tensor, weight: Tensor) -> Tensor:
    """(1 - w) h_base + w h_thought. The LM head is linear, so this equals mixing the two logits."""
    return h_base + weight * (h_thought - h_base)


def sample_from_logits(logits: Tensor, generator: torch.Generator | None = None, u: Tensor | None = None) -> Tensor:
    """One draw from softmax(logits) per row: (.., V) -> (..). Inverse-CDF sampling: one uniform number per row
    (torch.multinomial draws V exponential ones, the slowest op of a thought pass); the same distribution.
    u: the uniform numbers (.., 1), if not drawn here (machinery/parallel.py)."""
    cdf = (logits - logits.amax(dim=-1, keepdim=True)).exp().cumsum(dim=-1)        # (.., V), increasing
    u = torch.rand(*logits.shape[:-1], 1, device=logits.device, generator=generator) if u is None else u
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True)[..., 0].clamp(max=logits.shape[-1] - 1)


def head_logits(h: Tensor, weight: Tensor, bias: Tensor | None = None, banned: Tensor | None = None) -> Tensor:
    """lm_head(h) in at least fp32 (bf16 logits are too coarse for a softmax), with the banned ids at -inf."""
    logits = upcast(F.linear(h, weight, bias))
    return logits if banned is None else logits.index_fill_(-1, banned, float("-inf"))


def token_logprob(head: nn.Linear, h: Tensor, targets, temperature: float = 1.0, banned: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """log p(target | h) = log_softmax(head(h) / temperature)[target], in at least fp32 (bf16 is too coarse).
    h (.., D); targets (..) ids, or a function of the (.., V) logits that samples them; banned: ids set to -inf
    (never sampled). -> (log-prob (..), targets (..)). fast.token_logprob is the same without keeping the
    (.., V) logits for backward."""
    logits = head_logits(h, head.weight, head.bias, banned)
    if callable(targets):
        with torch.no_grad():
            targets = targets(logits)
    return (logits / temperature).log_softmax(dim=-1).gather(-1, targets[..., None])[..., 0], targets


class DenseThoughtCache(KVCache):
    """The KV cache of the thought passes, the official code's way: every pass appends its keys to one long
    cache (the real keys repeated for each of the M thoughts) and attends to all of it through
    attention_mask.thought_mask, (T, T * (offset + 1)). fast.ThoughtCache gives the same without the mask.
    at: the streams' positions (B, K), or None for one stream per position; kept per row (B*M, K)."""

    def begin_thoughts(self, n_thoughts: int, at: Tensor | None = None):
        self.T, self.at = len(self), None if at is None else at.repeat_interleave(n_thoughts, dim=0)
        self.keys = [k.repeat_interleave(n_thoughts, dim=0) for k in self.keys]       # (B*M, K, T, E)
        self.values = [v.repeat_interleave(n_thoughts, dim=0) for v in self.values]

    def mask(self, offset: int) -> Tensor:
        return thought_mask(self.T, offset, self.window, self.keys[0].device, self.at)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def talk_targets(tokens: Tensor, target_ok: Tensor, eos_ids: list[int], n_true: int) -> Tensor:
    """Which true tokens a thought is scored on: (B, N, T-1) bool, [b, u, i] = x_{i+1+u} exists, is a target
    (target_ok (B, T-1), False for padding), and no EOS lies in x_{i+1} .. x_{i+u}: predicting the EOS itself is
    fine, the tokens after it belong to the next document packed into the window."""
    B, T = tokens.shape
    N = min(n_true, T - 1)
    eos = torch.tensor(eos_ids, dtype=tokens.dtype, device=tokens.device)
    doc = torch.isin(tokens, eos).cumsum(dim=1)                                 # (B, T) document index
    scored = torch.zeros(B, N, T - 1, dtype=torch.bool, device=tokens.device)
    for u in range(N):
        scored[:, u, :T - 1 - u] = target_ok[:, u:] & (doc[:, u:T - 1] == doc[:, :T - 1 - u])
    return scored


def at_streams(x: Tensor, at: Tensor) -> Tensor:
    """x (B, .., T) per position -> (B, .., K): its values at the streams' positions at (B, K)."""
    index = at.view(at.shape[0], *[1] * (x.dim() - 2), at.shape[1])
    return x.gather(-1, index.expand(*x.shape[:-1], at.shape[1]))


def thought_rewards(talk_logp: Tensor, base_logp: Tensor, scored: Tensor) -> Tensor:
    """Step 4, the reward of each thought: sum over u of log p_talk(x_{i+1+u}) - log p_base(x_{i+1+u}).

    talk_logp (B*M, N, K): log-prob of x_{i+1+u} after the thought at i (mixed, or post: the post-thought
    prediction alone); base_logp (B*M, N, K): log-prob of the same token with no thought; scored (B*M, N, K):
    which terms count. -> (B*M, K), no gradient."""
    return ((talk_logp - base_logp) * scored).sum(dim=1).detach()


def advantages(reward: Tensor, clip_negative: bool) -> Tensor:
    """reward (B, M, K) -> advantage (B, M, K): the reward minus the mean over the M thoughts at the same
    position (the paper's baseline), clipped at 0 if clip_negative (only better-than-average thoughts are
    reinforced, as the official code does). With M = 1 the mean would equal the reward and the gradient would vanish; then, as in
    the official code, the advantage is the reward itself (the gain over no thought)."""
    if reward.shape[1] == 1:
        advantage = reward
    else:
        advantage = reward - reward.mean(dim=1, keepdim=True)
    return advantage.clamp(min=0) if clip_negative else advantage


def reinforce_loss(advantage: Tensor, thought_logp: Tensor, valid: Tensor) -> Tensor:
    """Step 5, REINFORCE. The paper (section 4.4) uses the gradient  -r_i * grad log p(T_i | X_{:i}, <start>)
    for the thought T_i at position i with advantage r_i; its loss is  mean over positions of -r_i * log p(T_i).

    advantage (B, M, K); thought_logp (B, M, K): log-probability of each sampled thought, summed over its tokens;
    valid (B, 1, K) or (B, M, K): streams that count. The advantage carries no gradient."""
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
    """A Mistral that thinks. QuietStar(model, config, tokenizer)(tokens) -> dict of loss parts. forward runs the
    five steps of the module docstring; base_pass, think and talk are steps 1-3 on their own, for a reader who wants
    to call them one at a time (the README's guided tour does)."""

    post_gets_gradient = False      # the post-thought log-probs are a diagnostic here (research/levers.py trains them)

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
        self.markers = ThoughtMarkers(model.embed_tokens.weight[marker_id], cfg.marker_grad_scale).to(device)
        self.mixing_head = MixingHead(dim, cfg.mixing_hidden or dim).to(device)
        model.activation_checkpointing = cfg.activation_checkpointing
        # A thought is text: EOS and the tokenizer's special tokens (chat roles, file separators) are never sampled.
        banned = set(model.config.eos_ids)
        if tokenizer is not None:
            banned |= {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        banned = sorted(i for i in banned if i < model.config.vocab_size)
        self.register_buffer("banned_thought_ids", torch.tensor(banned, dtype=torch.long, device=device),
                             persistent=False)
        # The swappable parts, plain here. fast.use(self) swaps in fast.py's equal, faster twins;
        # machinery/parallel.py a sampler that draws what one process with the whole batch would.
        self.thought_cache = DenseThoughtCache          # the KV cache and attention of the thought passes
        self.token_logprob = token_logprob              # log p(token | h) through the LM head
        self.embed_ids = model.embed                    # thought and teacher-forced token ids -> embeddings
        self.sample = sample_from_logits                # (.., V) logits -> one token per row

    @property
    def end_offset(self) -> int:
        """<end> sits at i + L + 2: after x_i, <start> (i + 1) and the L thought tokens."""
        return self.config.thought_len + 2

    def marker_embeddings(self) -> tuple[Tensor, Tensor]:
        """(start, end), each (D,): the input vectors exactly as the model sees them."""
        start, end = self.markers()
        dtype = self.model.embed_tokens.weight.dtype
        return start.to(dtype), end.to(dtype)

    # ---- one decoder pass for all positions, and the LM head on top -------------------------------------

    def _pass(self, embeds: Tensor, offset: int, cache) -> Tensor:
        """One thought pass: embeds (B*M, K, D), token `offset` of every stream, at positions i + offset ->
        hidden (B*M, K, D). K = T streams, or one per position in cache.at."""
        positions = thought_positions(embeds.shape[1], offset, embeds.device, cache.at)  # i + offset
        return self.model.hidden(embeds, positions, mask=cache.mask(offset), cache=cache)

    def _token_logp(self, h: Tensor, targets: Tensor) -> Tensor:
        """h (.., D), targets (..) -> log softmax(lm_head(h))[targets] (..): a prediction's log-prob of a token."""
        return self.token_logprob(self.model.lm_head, h, targets)[0]

    def thought_token_logits(self, h: Tensor) -> Tensor:
        """The LM head's logits for a thought token (at least fp32): never EOS or a special token."""
        return head_logits(h, self.model.lm_head.weight, self.model.lm_head.bias, self.banned_thought_ids)

    def _thought_token(self, h: Tensor, forced: Tensor | None) -> tuple[Tensor, Tensor]:
        """Step 2's choice of the next thought token: h (B*M, T, D) -> (log-prob at the REINFORCE temperature,
        token (B*M, T)). The token is sampled from softmax(logits / thought_temperature), never EOS or a
        special token, unless `forced` (teacher-forced thoughts). No gradient flows through the choice."""
        cfg = self.config

        def sample(logits: Tensor) -> Tensor:                    # (B*M, T, V) with the banned ids at -inf
            return self.sample(logits if cfg.thought_temperature == 1 else logits / cfg.thought_temperature)
        return self.token_logprob(self.model.lm_head, h, sample if forced is None else forced,
                                  cfg.reinforce_temperature or cfg.thought_temperature, self.banned_thought_ids)

    # ---- the steps ----------------------------------------------------------------------------------------

    def base_pass(self, tokens: Tensor):
        """Step 1: the plain causal pass over the real tokens, shared by all M thoughts.
        tokens (B, T) -> (hidden (B, T, D), the cache every thought attends to)."""
        cache = self.thought_cache(self.model.config.n_layers, self.model.config.sliding_window)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.model.hidden(self.model.embed(tokens), positions, cache=cache), cache

    def think(self, tokens: Tensor, cache, n_thoughts: int, thought_ids: Tensor | None = None,
              at: Tensor | None = None):
        """Step 2: <start>, then c_1 .. c_L, one pass each, for all B*M streams at once: one stream per position,
        or per selected position at (B, K). <start> of position i sits at i + 1 and thought token c_j at i + 1 + j
        (the module docstring draws it); each sees x_0 .. x_i and its own thought only.

        thought_ids (B*M, K, L) or None to sample them (K = T without `at`). -> (thought ids (B*M, K, L), their
        summed log-probs at the REINFORCE temperature (B*M, K)); afterwards the cache holds the whole thought."""
        L = self.config.thought_len
        BM, K = tokens.shape[0] * n_thoughts, tokens.shape[1] if at is None else at.shape[1]
        start, _ = self.marker_embeddings()
        x = start.expand(BM, K, -1)                                              # (B*M, K, D)
        cache.begin_thoughts(n_thoughts, at)
        ids, logp_sum = [], 0.0
        for j in range(L + 1):
            h = self._pass(x, offset=1 + j, cache=cache)                          # input: <start> or c_j
            if j == L:
                break                                                             # c_L only fills the cache
            forced = thought_ids[..., j] if thought_ids is not None else None
            logp, c = self._thought_token(h, forced)
            ids.append(c)
            logp_sum = logp_sum + logp
            x = self.embed_ids(c)
        return torch.stack(ids, dim=-1), logp_sum

    def talk(self, tokens: Tensor, h_base: Tensor, cache, n_thoughts: int) -> dict[str, Tensor]:
        """Step 3: <end>, then the true tokens x_{i+1} .. x_{i+N-1}, teacher-forced, for think()'s streams (at the
        positions i in cache.at, or at every position). Pass u predicts x_{i+1+u}, mixed with the base state
        h_base_{i+u} that predicts the same token. For T = 5, N = 2, every position:

            position i          0    1    2    3    4
            pass u=0: input   <end><end><end><end><end>      predicts x1 x2 x3 x4 (-)
            pass u=1: input     x1   x2   x3   x4  (x4)      predicts x2 x3 x4 (-) (-)
            base state used    h_base_{i+u}: h0..h3 for u=0, h1..h3 for u=1

        -> {"logp_mixed": (B*M, N, K) log-prob of x_{i+1+u} after the thought at i, mixed (0 past the end),
            "logp_post": the same from the post-thought prediction alone (no gradient unless
                         post_gets_gradient), "mix_weight": (B*M, N, K) the mixing weight used}"""
        cfg, T = self.config, tokens.shape[1]
        streams = tokens.repeat_interleave(n_thoughts, dim=0)                    # (B*M, T)
        h_base = h_base.repeat_interleave(n_thoughts, dim=0)                     # (B*M, T, D)
        at = cache.at if cache.at is not None else torch.arange(T, device=tokens.device).expand(len(streams), T)
        rows = torch.arange(len(streams), device=tokens.device)[:, None].expand_as(at)    # (B*M, K)
        _, end = self.marker_embeddings()
        x = end.expand(*at.shape, -1)
        out = {"logp_mixed": [], "logp_post": [], "mix_weight": []}
        for u in range(min(cfg.n_true, T - 1)):
            h = self._pass(x, self.end_offset + u, cache)                          # (B*M, K, D)
            inside = at + 1 + u <= T - 1                                           # x_{i+1+u} exists
            r, i = rows[inside], at[inside] + u                                    # (n,) each: row, position i+u
            h_thought, h_same = h[inside], h_base[r, i]                            # (n, D) both predict x_{i+1+u}
            w = self.mixing_weight(h_same, h_thought, inside)                      # (n, 1)
            values = {"logp_mixed": self._token_logp(mix(h_same, h_thought, w), streams[r, i + 1]),
                      "mix_weight": w[:, 0]}
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.post_gets_gradient):
                values["logp_post"] = self._token_logp(h_thought, streams[r, i + 1])
            for name, value in values.items():
                full = upcast(h.new_zeros(at.shape))
                full[inside] = value.to(full.dtype)
                out[name].append(full)
            x = self.embed_ids(streams[rows, (at + 1 + u).clamp(max=T - 1)])      # next input: x_{i+1+u}
        return {name: torch.stack(v, dim=1) for name, v in out.items()}

    def mixing_weight(self, h_base: Tensor, h_thought: Tensor, inside: Tensor) -> Tensor:  # inside: talk's streams
        return self.mixing_head(h_base, h_thought)                  # (n, 1); research/levers.py reads `inside`

    def rewards(self, tokens: Tensor, target_ok: Tensor, logp_base: Tensor, talk: dict, positions: Tensor,
                n_thoughts: int) -> tuple[dict[str, Tensor], Tensor]:
        """Step 4 for talk()'s streams at positions (B, K): {"mixed", "post"}: each (B*M, K), the reward from the
        mixed and from the post-thought prediction; and which true tokens count, scored (B*M, N, K)."""
        N = talk["logp_mixed"].shape[1]
        scored = at_streams(F.pad(talk_targets(tokens, target_ok, self.model.config.eos_ids, N), (0, 1)), positions)
        base = torch.stack([at_streams(F.pad(logp_base.detach(), (0, N)), positions + u) for u in range(N)], dim=1)
        scored, base = scored.repeat_interleave(n_thoughts, dim=0), base.repeat_interleave(n_thoughts, dim=0)
        return {"mixed": thought_rewards(talk["logp_mixed"], base, scored),
                "post": thought_rewards(talk["logp_post"], base, scored)}, scored

    def streams(self, tokens: Tensor, target_ok: Tensor, h_base: Tensor, cache, logp_base: Tensor,
                at: Tensor | None = None, thought_ids: Tensor | None = None) -> dict:
        """Steps 2 to 4 for M thoughts at every position (or at the positions at (B, K)): think, talk, reward.
        -> thought_ids, thought_logp (B*M, K), rewards {"mixed", "post"} (B*M, K), valid (B*M, K): streams with a
        next token, talk's outputs, and its mean NLLs over N: nll_talk (mixed) and nll_post."""
        (B, T), M = tokens.shape, self.config.n_thoughts
        positions = torch.arange(T, device=tokens.device).expand(B, T) if at is None else at      # (B, K)
        # 2. think: one thought per stream, M streams per position
        ids, thought_logp = self.think(tokens, cache, M, thought_ids, at)          # (B*M, K, L), (B*M, K)
        # 3. talk: <end>, then the next N true tokens, each mixed with its base prediction
        talk = self.talk(tokens, h_base, cache, M)                                 # (B*M, N, K) each
        # 4. the reward of each thought: its gain over no thought on the next N true tokens
        rewards, scored = self.rewards(tokens, target_ok, logp_base, talk, positions, M)   # (B*M, K), (B*M, N, K)
        nll_talk, nll_post = (torch.stack([masked_mean(-talk[key][:, u], scored[:, u]) for u in range(scored.shape[1])
                                           ]).mean() for key in ("logp_mixed", "logp_post"))
        valid = at_streams(F.pad(target_ok, (0, 1)), positions).repeat_interleave(M, dim=0)   # (B*M, K)
        return {"thought_ids": ids, "thought_logp": thought_logp, "rewards": rewards, "valid": valid, "talk": talk,
                "nll_talk": nll_talk, "nll_post": nll_post}

    def forward(self, tokens: Tensor, loss_mask: Tensor | None = None, think: bool = True) -> dict[str, Tensor]:
        """tokens (B, T) -> {loss, policy_term (= policy_weight * reinforce), nll_base, nll_mixed (the next token
        after a thought, mixed), nll_talk (mixed, the mean over the N true tokens), nll_post (the same from the
        post-thought prediction alone: a diagnostic, not in the loss), reinforce, reward_mean, mix_weight_mean}.
        loss_mask (B, T): False for padding; a token that is False is never a target. Documents packed into
        one window are separated by EOS: a thought is never scored on the tokens of the next document.
        think=False: plain next-token training, {loss = nll_base, nll_base} (no thought passes at all)."""
        cfg, (B, T), M = self.config, tokens.shape, self.config.n_thoughts
        target_ok = (loss_mask if loss_mask is not None else torch.ones_like(tokens, dtype=torch.bool))[:, 1:]
        # 1. base pass, no thoughts
        h_base, cache = self.base_pass(tokens)
        logp_base = self._token_logp(h_base[:, :-1], tokens[:, 1:])                  # (B, T-1)
        nll_base = masked_mean(-logp_base, target_ok)
        if not think:
            return {"loss": nll_base, "nll_base": nll_base.detach()}
        # 2. to 4. think, talk and reward, M thoughts at every position
        s = self.streams(tokens, target_ok, h_base, cache, logp_base)
        # 5. the losses: the base and mixed NLLs, and REINFORCE with the mean of the M rewards as the baseline
        reward = s["rewards"]["mixed"]
        advantage = advantages(reward.view(B, M, T), cfg.clip_negative_advantage)
        policy_term = cfg.policy_weight * (reinforce := reinforce_loss(advantage, s["thought_logp"].view(B, M, T),
                                                                       s["valid"].view(B, M, T)))
        loss = cfg.base_loss_weight * nll_base + (1 - cfg.base_loss_weight) * s["nll_talk"] + policy_term
        return {"loss": loss, "policy_term": policy_term} | self.summary(nll_base, s, reward, reinforce)

    @staticmethod
    def summary(nll_base: Tensor, s: dict, reward: Tensor, reinforce: Tensor) -> dict[str, Tensor]:
        """The logged parts of a training forward, none with a gradient. s["valid"] (B*M, K): the next token."""
        first = s["valid"]
        return {"nll_base": nll_base.detach(),                                    # next token, no thought
                "nll_mixed": masked_mean(-s["talk"]["logp_mixed"][:, 0], first).detach(),   # ... after a thought
                "nll_talk": s["nll_talk"].detach(), "nll_post": s["nll_post"].detach(), "reinforce": reinforce.detach(),
                "reward_mean": masked_mean(reward, first),                        # gain over no thought
                "mix_weight_mean": masked_mean(s["talk"]["mix_weight"][:, 0], first).detach()}
