"""Research levers beyond the paper, kept out of qstar.py so that the paper's path stays short to read.

    where to think     think_at: all (the paper) | entropy:Q | random:Q | answers (before each bare answer's first
                       digit) | digits (before every digit of a bare answer) | answers+random:Q | digits+random:Q
    the reward         reward_from: mixed (the paper) | post (the post-thought prediction alone, as RLP)
    the baseline       baseline: mean (the paper: the M rewards' mean, the thought itself included) | loo (the
                       mean of the other M - 1, RLP's leave-one-out); group_std divides by the M rewards' std;
                       clip_negative_advantage (qstar) keeps or drops the below-baseline thoughts
    the reader         post_nll_weight: the post-thought prediction's own NLL, so that it learns to use a thought
    the mixing weight  bounded_mixing: w = mixing_floor + (1 - mixing_floor) sigmoid(z - 4.595), starting at 0.01;
                       mixing_from_forced False: the mixing head learns only from the model's own thoughts (a forced
                       thought is always right, so learning from it drives w to 1, and the model's own are not)
    a warm start       forced_fraction (set each step by train.py's schedule): at answer positions each thought is,
                       with this probability, teacher-forced to the problem's worked step (the oracle thought) and
                       learnt by its NLL (forced_nll_weight); REINFORCE sees only the model's own samples
    the start's policy kl_to_start beta > 0: each own thought's reward minus beta (log pi(c) - log pi_start(c)),
                       summed over its tokens, pi_start a frozen copy of the policy the thinking phase started from
                       (set_start_policy): the sampled log-ratio is an unbiased estimate of KL(pi || pi_start), so
                       REINFORCE maximises reward - beta KL and keeps near the plain model's writer
    answers' NLL       base_learns_answers False: the bare answers' digits are out of the base NLL and the mixed
                       prediction's base state is detached there, so only a thought can lower their NLL (the trunk
                       still learns them through the post-thought pass)

Levers(model, LeverConfig(...), tokenizer) is a QuietStar whose forward uses them; build() returns the plain
QuietStar when none is on, so the default run is the paper's path. "answers" needs, per window, where the bare
answers start: forward's answer_start (B, T) bool marks each bare answer's first digit (built-in arithmetic only).
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from qstar import MixingHead, QuietStar, QuietStarConfig, at_streams, masked_mean, reinforce_loss

RULES = ("all", "answers", "digits")                                      # think_at without a fraction
RULES_WITH_Q = ("entropy", "random", "answers+random", "digits+random")  # think_at RULE:Q


@dataclass
class LeverConfig(QuietStarConfig):
    think_at: str = "all"              # all | entropy:Q | random:Q | answers | digits | answers+random:Q | ...
    reward_from: str = "mixed"         # mixed (the paper) | post: the post-thought prediction alone (RLP)
    baseline: str = "mean"             # mean: of the M rewards (the paper) | loo: of the other M - 1 (RLP)
    group_std: bool = False            # divide each advantage by the std of its position's M rewards (GRPO, RLP)
    post_nll_weight: float = 0.0       # NLL of the post-thought prediction itself: the reader learns to use a thought
    bounded_mixing: bool = False       # mixing weight in [mixing_floor, 1], starting at 0.01; False: unbounded (official)
    mixing_floor: float = 0.0          # bounded_mixing: the weight never falls below this (no absorbing collapse)
    forced_nll_weight: float = 1.0     # weight of the forced (worked-step) thoughts' NLL in the warm start
    mixing_from_forced: bool = True    # False: no gradient from forced thoughts to the mixing head (its own only)
    oracle_padding: str = "front"      # the worked step's filler: front ("...23+19=42.") or end ("23+19=42....")
    base_learns_answers: bool = True   # False: the bare answers' digits train only the predictions after a thought
    kl_to_start: float = 0.0           # beta: an own thought's reward minus beta log(pi / pi_start) of its tokens

    def __post_init__(self):
        super().__post_init__()
        if self.reward_from not in ("mixed", "post"):
            hint = " (its old name 'thought' is now 'post')" if self.reward_from == "thought" else ""
            raise ValueError(f"--reward_from must be mixed or post, got {self.reward_from!r}{hint}")
        if self.baseline not in ("mean", "loo"):
            raise ValueError(f"--baseline must be mean or loo, got {self.baseline!r}")
        for name in ("post_nll_weight", "forced_nll_weight", "kl_to_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.oracle_padding not in ("front", "end"):
            raise ValueError(f"--oracle_padding must be front or end, got {self.oracle_padding!r}")
        if not 0 <= self.mixing_floor < 1:
            raise ValueError(f"--mixing_floor must be in [0, 1), got {self.mixing_floor}")
        _ = self.think_fraction                    # raises on a malformed think_at

    @property
    def think_rule(self) -> str:
        return self.think_at.partition(":")[0]

    @property
    def think_fraction(self) -> float | None:
        """think_at as a number: None for "all", "answers" and "digits", Q for the rules with ":Q"."""
        rule, _, q = self.think_at.partition(":")
        if rule in RULES and not q:
            return None
        try:
            if rule in RULES_WITH_Q and 0 < float(q) <= 1:
                return float(q)
        except ValueError:
            pass
        raise ValueError(f"--think_at must be all, entropy:Q, random:Q, answers, digits, answers+random:Q or "
                         f"digits+random:Q with 0 < Q <= 1 (e.g. entropy:0.1), got {self.think_at!r}")

    @property
    def uses_levers(self) -> bool:
        """Any setting that the paper's QuietStar.forward does not have."""
        return any(getattr(self, f.name) != f.default for f in fields(LeverConfig)
                   if f.name not in {g.name for g in fields(QuietStarConfig)} and f.name != "forced_nll_weight")


RENAMED = {"thought_nll_weight": "post_nll_weight"}         # old option name -> new


def renamed_settings(values: dict, old_run: bool = False) -> dict:
    """Settings under their current names. old_run: a saved run's (renamed keys and reward_from "thought" read as
    today's); else (the command line) an old name is an error naming the new one."""
    for old, new in RENAMED.items():
        if old in values and not old_run:
            raise ValueError(f"--{old} is now --{new}")
    values = {RENAMED.get(k, k): v for k, v in values.items()}
    if old_run and values.get("reward_from") == "thought":
        values["reward_from"] = "post"
    return values


def build(model, config: QuietStarConfig, tokenizer=None) -> QuietStar:
    """QuietStar on the paper's path when no lever is on, else Levers."""
    if isinstance(config, LeverConfig) and config.uses_levers:
        return Levers(model, config, tokenizer)
    if isinstance(config, LeverConfig):        # the paper's fields only
        config = QuietStarConfig(**{f.name: getattr(config, f.name) for f in fields(QuietStarConfig)})
    return QuietStar(model, config, tokenizer)


class BoundedMixingHead(MixingHead):
    """The mixing weight squashed into [floor, 1]: floor + (1 - floor) sigmoid(z - 4.595), 0.01 at z = 0 (with
    floor 0). Without a floor its collapse is absorbing: once w ~ 1e-5 the gradient reaching z is scaled by
    w (1 - w) and it does not come back."""

    def __init__(self, dim: int, hidden: int, floor: float = 0.0):
        super().__init__(dim, hidden)
        self.floor = floor

    def forward(self, h_base: Tensor, h_thought: Tensor) -> Tensor:
        z = self.net(torch.cat([h_base, h_thought], dim=-1).to(self.net[0].weight.dtype))
        w = self.floor + (1 - self.floor) * torch.sigmoid(z - 4.595)                 # sigmoid(-4.595) = 0.0100
        return w.type_as(h_base)


def select_positions(base_logits: Tensor, target_ok: Tensor, fraction: float, by: str = "entropy") -> Tensor:
    """think_at entropy:Q: in each window the ceil(Q * (T-1)) positions whose base prediction of x_{i+1} has the
    highest entropy, -sum p log p; by="random" (random:Q, the control): as many positions drawn uniformly (torch's
    generator). base_logits (B, T-1, V), target_ok (B, T-1) -> positions (B, K), ascending. Positions without a
    target come last. No gradient: the choice is not learned."""
    if by == "random":
        score = torch.rand(target_ok.shape, device=target_ok.device)
    else:
        logp = base_logits.detach().float().log_softmax(dim=-1)
        score = (-logp.exp() * logp).nan_to_num().sum(dim=-1)                                 # 0 log 0 = 0
    score = score.masked_fill(~target_ok, float("-inf"))
    k = min(score.shape[1], max(1, math.ceil(fraction * score.shape[1])))
    return score.topk(k, dim=1).indices.sort(dim=1).values


def answer_positions(answer_start: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """think_at answers: the positions i whose next token x_{i+1} is a bare answer's first digit. answer_start
    (B, T) bool marks those digits; extra (B, K'): more positions to add (answers+random:Q). -> positions (B, K)
    ascending, and real (B, K): False for the padding of a row with fewer (which repeats its last position, or
    position 0 in a row without any)."""
    chosen = answer_start[:, 1:].clone()                                         # (B, T-1) over positions i
    if extra is not None:
        chosen.scatter_(1, extra, True)
    counts = chosen.sum(dim=1)
    K = max(1, int(counts.max()))
    order = torch.arange(chosen.shape[1], device=chosen.device).expand_as(chosen)
    key = torch.where(chosen, order, order + chosen.shape[1])                   # chosen first, in order
    at = key.sort(dim=1).values[:, :K] % chosen.shape[1]
    real = torch.arange(K, device=at.device)[None] < counts[:, None]
    last = at.gather(1, (counts - 1).clamp(min=0)[:, None]).where(counts[:, None] > 0, torch.zeros_like(at[:, :1]))
    return torch.where(real, at, last), real


def lever_advantages(reward: Tensor, baseline: str, group_std: bool, clip_negative: bool,
                     own: Tensor | None = None) -> Tensor:
    """reward (B, M, K) -> advantage (B, M, K). own (B, M, K): the model's own samples (default all); a forced
    thought is not the policy's, so it is neither judged nor part of a baseline. With n own samples at a position:
    baseline "mean": r_m - their mean (the paper); "loo": r_m - the mean of the other n - 1 = n / (n - 1) (r_m -
    mean), an unbiased baseline since it does not hold r_m itself. group_std: divided by their std (+1e-4: equal
    rewards give 0). clip_negative: below 0 -> 0. 0 where the thought is not own or n < 2 (nothing to compare
    with); with M = 1 the advantage is the reward itself (the gain over no thought), as in qstar.advantages."""
    own = torch.ones_like(reward, dtype=torch.bool) if own is None else own
    if reward.shape[1] == 1:
        advantage = reward.where(own, 0.0)
    else:
        n = own.sum(dim=1, keepdim=True)                                       # (B, 1, K)
        mean = reward.where(own, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)
        advantage = reward - mean
        if baseline == "loo":
            advantage = advantage * n / (n - 1).clamp(min=1)
        if group_std:
            var = ((reward - mean) ** 2).where(own, 0.0).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
            advantage = advantage / (var.sqrt() + 1e-4)
        advantage = advantage.where(own & (n > 1), 0.0)
    return advantage.clamp(min=0) if clip_negative else advantage


def reward_sources(rewards: dict[str, Tensor], valid: Tensor, n_thoughts: int) -> dict[str, Tensor]:
    """How the two reward sources judge the same two thoughts (the first two of each position): the mean gap
    |R1 - R2| under each, and how often they agree on which is better. rewards {source: (B*M, K)}; valid (B, K)."""
    if n_thoughts < 2:
        return {}
    gap = {s: r.view(-1, n_thoughts, r.shape[-1])[:, 0] - r.view(-1, n_thoughts, r.shape[-1])[:, 1]
           for s, r in rewards.items()}                                        # (B, K) each
    return {"reward_gap_mixed": masked_mean(gap["mixed"].abs(), valid),
            "reward_gap_post": masked_mean(gap["post"].abs(), valid),
            "reward_agreement": masked_mean((gap["mixed"].sign() == gap["post"].sign()).float(), valid)}


class Levers(QuietStar):
    """QuietStar with the levers of LeverConfig. forward(tokens, loss_mask, think, answer_start, oracle,
    answer_digits): answer_start (B, T) marks bare answers' first digits (think_at answers, the warm start, the logs
    at answers); oracle (B, T, L): the worked-step thought of each position before an answer (forced with
    forced_fraction); answer_digits (B, T): all their digits (base_learns_answers False; think_at digits, where they
    take answer_start's place)."""

    def __init__(self, model, config: LeverConfig, tokenizer=None):
        super().__init__(model, config, tokenizer)
        if config.bounded_mixing:
            device = self.markers.stored.device
            self.mixing_head = BoundedMixingHead(model.config.dim, config.mixing_hidden or model.config.dim,
                                                 config.mixing_floor).to(device)
        self.post_gets_gradient = config.post_nll_weight > 0
        self.forced_fraction = 0.0                       # train.py's warm-start schedule sets it every step
        self.head_ignores = None                         # (B*M, K) bool: streams whose w gets no gradient
        self.set_start_policy(None)

    def set_start_policy(self, policy: QuietStar | None):
        """kl_to_start's frozen reference. Kept outside the module tree: neither saved, trained nor moved with it."""
        object.__setattr__(self, "start_policy", policy)

    @torch.no_grad()
    def log_ratio_to_start(self, tokens: Tensor, thought_ids: Tensor, thought_logp: Tensor, at: Tensor | None
                           ) -> Tensor:
        """log pi(c) - log pi_start(c) of each stream's thought c (B*M, K): the start's policy run on the same
        tokens and thoughts (teacher-forced), at the same temperature."""
        if self.start_policy is None:
            raise ValueError("--kl_to_start needs the policy the thinking phase starts from (train.py: --start_policy)")
        _, cache = self.start_policy.base_pass(tokens)
        _, start_logp = self.start_policy.think(tokens, cache, self.config.n_thoughts, thought_ids, at)
        return thought_logp.detach() - start_logp

    def mixing_weight(self, h_base: Tensor, h_thought: Tensor, inside: Tensor) -> Tensor:
        """qstar's mixing weight (n, 1) for talk's streams `inside` (B*M, K); detached on the streams in
        head_ignores, so that the head learns from the others only (the mixed NLL still trains the rest)."""
        w = self.mixing_head(h_base, h_thought)
        if self.head_ignores is None:
            return w
        return torch.where(self.head_ignores[inside][:, None], w.detach(), w)

    def where_to_think(self, h_base: Tensor, target_ok: Tensor, answer_start: Tensor | None):
        """-> (positions (B, K) or None for every position, real (B, K) or None: False for padding positions)."""
        cfg = self.config
        rule, q = cfg.think_rule, cfg.think_fraction
        if rule == "all":
            return None, None
        if rule.startswith(("answers", "digits")):
            if answer_start is None:
                raise ValueError("--think_at answers needs where the bare answers start (built-in arithmetic "
                                 "with --bare_fraction > 0)")
            extra = select_positions(None, target_ok, q, "random") if q else None
            return answer_positions(answer_start, extra)
        with torch.no_grad():
            logits = self.model.lm_head(h_base[:, :-1]) if rule == "entropy" else None
            return select_positions(logits, target_ok, q, rule), None

    def _thought_token(self, h: Tensor, forced: Tensor | None) -> tuple[Tensor, Tensor]:
        """qstar's choice of a thought token, where forced may be partial: -1 marks the streams that sample."""
        if forced is None or bool((forced >= 0).all()):
            return super()._thought_token(h, forced)
        cfg = self.config

        def sample_or_force(logits: Tensor) -> Tensor:
            drawn = self.sample(logits if cfg.thought_temperature == 1 else logits / cfg.thought_temperature)
            return torch.where(forced >= 0, forced, drawn)
        return self.token_logprob(self.model.lm_head, h, sample_or_force,
                                  cfg.reinforce_temperature or cfg.thought_temperature, self.banned_thought_ids)

    def forward(self, tokens: Tensor, loss_mask: Tensor | None = None, think: bool = True,
                answer_start: Tensor | None = None, oracle: Tensor | None = None,
                answer_digits: Tensor | None = None) -> dict[str, Tensor]:
        cfg, (B, T) = self.config, tokens.shape
        M, L = cfg.n_thoughts, cfg.thought_len
        if cfg.think_rule.startswith("digits"):        # every digit of a bare answer is a place to think
            answer_start = answer_digits
        target_ok = (loss_mask if loss_mask is not None else torch.ones_like(tokens, dtype=torch.bool))[:, 1:]
        h_base, cache = self.base_pass(tokens)
        logp_base = self._token_logp(h_base[:, :-1], tokens[:, 1:])                  # (B, T-1)
        nll_base = masked_mean(-logp_base, target_ok)
        if not think:
            return {"loss": nll_base, "nll_base": nll_base.detach()}
        nll_base_learnt, h_talk = nll_base, h_base             # what the base NLL trains on; talk's base states
        if not cfg.base_learns_answers:
            if answer_digits is None:
                raise ValueError("--no-base_learns_answers needs where the bare answers are (built-in arithmetic "
                                 "with --bare_fraction > 0)")
            nll_base_learnt = masked_mean(-logp_base, target_ok & ~answer_digits[:, 1:])
            h_talk = h_base.detach()                   # the mixed prediction's base half: no gradient to the trunk
        at, real = self.where_to_think(h_base, target_ok, answer_start)
        positions = torch.arange(T, device=tokens.device).expand(B, T) if at is None else at       # (B, K)
        K = positions.shape[1]
        # the streams at answer positions: logged, and where the warm start forces the worked step
        at_answer = (at_streams(F.pad(answer_start[:, 1:], (0, 1)), positions) if answer_start is not None
                     else torch.zeros(B, K, dtype=torch.bool, device=tokens.device))
        at_answer = at_answer.repeat_interleave(M, dim=0)                           # (B*M, K)
        forced = torch.zeros_like(at_answer)
        thought_ids = None
        if oracle is not None and self.forced_fraction > 0:
            forced = at_answer & (torch.rand(at_answer.shape, device=tokens.device) < self.forced_fraction)
            given = at_streams(oracle.permute(0, 2, 1), positions).permute(0, 2, 1).repeat_interleave(M, dim=0)
            thought_ids = torch.where(forced[..., None], given, torch.full_like(given, -1))   # (B*M, K, L)
        self.head_ignores = None if cfg.mixing_from_forced or not forced.any() else forced
        try:
            s = self.streams(tokens, target_ok, h_talk, cache, logp_base, at, thought_ids)
        finally:
            self.head_ignores = None
        valid = s["valid"] & (True if real is None else real.repeat_interleave(M, dim=0))     # (B*M, K)
        sampled = valid & ~forced                                                   # REINFORCE: own samples only
        reward, logs = s["rewards"][cfg.reward_from], {}
        if cfg.kl_to_start > 0:
            log_ratio = self.log_ratio_to_start(tokens, s["thought_ids"], s["thought_logp"], at)   # (B*M, K)
            reward = reward - cfg.kl_to_start * log_ratio.where(sampled, 0.0)
            logs["kl_to_start"] = masked_mean(log_ratio, sampled)
        advantage = lever_advantages(reward.view(B, M, K), cfg.baseline, cfg.group_std, cfg.clip_negative_advantage,
                                     sampled.view(B, M, K))
        reinforce = reinforce_loss(advantage, s["thought_logp"].view(B, M, K), sampled.view(B, M, K))
        nll_forced = masked_mean(-s["thought_logp"], forced & valid) / L            # per forced thought token
        policy_term = cfg.policy_weight * reinforce
        loss = (cfg.base_loss_weight * nll_base_learnt + (1 - cfg.base_loss_weight) * s["nll_talk"] +
                cfg.post_nll_weight * s["nll_post"] + cfg.forced_nll_weight * nll_forced + policy_term)
        s["valid"] = valid
        w = s["talk"]["mix_weight"][:, 0]
        logs |= {"answer_streams": masked_mean(at_answer.float(), sampled),   # REINFORCE's streams at answers
                 "forced_streams": masked_mean(forced.float(), valid), "nll_forced": nll_forced.detach(),
                 "mix_weight_answers": masked_mean(w, valid & at_answer).detach(),
                 "mix_weight_elsewhere": masked_mean(w, valid & ~at_answer).detach()}
        return ({"loss": loss, "policy_term": policy_term} | self.summary(nll_base, s, reward, reinforce) | logs |
                reward_sources(s["rewards"], valid.view(B, M, K)[:, 0], M))
