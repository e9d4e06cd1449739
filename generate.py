"""Thinking at inference: every position's prediction after one thought (predict, token_scores: what the
evaluations score), and text generation, plain or thinking before every token: <start>, a sampled thought, <end>,
then the mixed prediction.

    python generate.py --model out --prompt "Q: Tom has 23 apples and finds 19 more. How many?\\nA:"
    python generate.py --model out --no-thinking            # plain decoding, the same loop

One decoding loop serves both. The real tokens keep a KV cache. Before each new token a thought branches off that
cache (L + 2 one-token passes at positions after the last real token) and is dropped afterwards, so a thought
costs L + 2 cached single-token passes, not a pass over the whole text as in the official evaluation script. The
markers are not in the vocabulary, so they can never be emitted (the official README's pitfall cannot happen).
"""

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from machinery.cli import BoolFlag, Parser, UsageError, add_model_options, at_least, fail
from machinery.hf_io import load_model
from model import Mistral
from qstar import QuietStar, at_streams, mix, sample_from_logits


# ---- every position at once: one thought per position, the prediction after it ------------------------------

def end_hidden(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor | None = None,
               at: torch.Tensor | None = None, n_thoughts: int = 1):
    """n_thoughts thoughts per position (or per position in at (B, K)), up to <end>, after one base pass: ->
    h_base (B, T, D), h_end (B*n, T or K, D) and the thought ids (B*n, T or K, L), rows b*n .. b*n+n-1 for text b."""
    h_base, cache = qs.base_pass(tokens)
    ids, _ = qs.think(tokens, cache, n_thoughts, thought_ids, at)
    _, end = qs.marker_embeddings()
    return h_base, qs._pass(end.expand(*ids.shape[:2], -1), qs.end_offset, cache), ids


@torch.no_grad()
def sample_thoughts(qs: QuietStar, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) -> one sampled thought per position, ids (B, T, L)."""
    _, cache = qs.base_pass(tokens)
    return qs.think(tokens, cache, 1)[0]


def thought_logits(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, T), thought_ids (B, T, L) -> LM-head logits (B, T, V) of the hidden state at <end>
    (before mixing): what each position predicts for x_{i+1} right after its own thought."""
    if thought_ids.shape != (*tokens.shape, qs.config.thought_len):
        raise ValueError(f"thought_ids must be (B, T, thought_len) = {(*tokens.shape, qs.config.thought_len)}, "
                         f"got {tuple(thought_ids.shape)}")
    return qs.model.lm_head(end_hidden(qs, tokens, thought_ids)[1])


@torch.no_grad()
def predict(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What every position i predicts for x_{i+1}, without and with a thought (one sampled per position). Every
    position thinks, also where training thinks at chosen positions only: the controls are then measured
    wherever they might matter, and the mixing head decides how much each thought is used.

    -> h_base, h_mixed, h_post (B, T, D): LM-head inputs (apply qs.model.lm_head for logits) with no thought,
       mixed, and the post-thought prediction alone; mix_weight (B, T); thought_ids (B, T, L)."""
    h_base, h_end, ids = end_hidden(qs, tokens, thought_ids)
    mix_weight = qs.mixing_head(h_base, h_end)
    return {"h_base": h_base, "h_mixed": mix(h_base, h_end, mix_weight), "h_post": h_end,
            "mix_weight": mix_weight[..., 0], "thought_ids": ids}


@torch.no_grad()
def scores_at(qs: QuietStar, tokens: torch.Tensor, at: torch.Tensor, thought_ids: torch.Tensor | None = None) -> dict:
    """token_scores for the positions at (B, K) only (each with a next token), thinking there alone: nll_base,
    nll_mixed, nll_post, mix_weight (B, K) and thought_ids (B, K, L). Far cheaper when only a few positions matter (the
    digits of a bare answer); equal to token_scores there (tests/test_levers.py). Given thoughts (B, P, K, L): P
    sets scored after one shared base pass (as P thoughts per position), each output (B, P, K)."""
    B, sets = tokens.shape[0], 1 if thought_ids is None or thought_ids.dim() == 3 else thought_ids.shape[1]
    given = None if thought_ids is None else thought_ids.reshape(-1, *thought_ids.shape[-2:])      # (B*P, K, L)
    h_base, h_end, ids = end_hidden(qs, tokens, given, at, sets)                 # h_end (B*P, K, D)
    h_same = at_streams(h_base.transpose(1, 2), at).transpose(1, 2).repeat_interleave(sets, dim=0)   # h_base there
    mix_weight, targets = qs.mixing_head(h_same, h_end), tokens.gather(1, at + 1).repeat_interleave(sets, dim=0)
    out = {"nll_base": -qs._token_logp(h_same, targets),
           "nll_mixed": -qs._token_logp(mix(h_same, h_end, mix_weight), targets),
           "nll_post": -qs._token_logp(h_end, targets), "mix_weight": mix_weight[..., 0], "thought_ids": ids}
    return out if thought_ids is None or thought_ids.dim() == 3 else {k: v.view(B, sets, *v.shape[1:])
                                                                      for k, v in out.items()}


@torch.no_grad()
def token_scores(qs: QuietStar, tokens: torch.Tensor, thought_ids: torch.Tensor | None = None) -> dict:
    """Per-token view, for evaluation and the thoughts page: nll_base, nll_mixed and nll_post (B, T-1), the NLL
    of x_{i+1} without the thought at i, after it mixed, and after it from the post-thought prediction alone;
    mix_weight (B, T-1); thought_ids (B, T, L)."""
    p = predict(qs, tokens, thought_ids)
    nll = {f"nll_{name}": -qs._token_logp(p[f"h_{name}"][:, :-1], tokens[:, 1:]) for name in ("base", "mixed", "post")}
    return nll | {"mix_weight": p["mix_weight"][:, :-1], "thought_ids": p["thought_ids"]}


# ---- generation: one token at a time ----------------------------------------------------------------------

@dataclass
class Generation:
    text: str                                         # the continuation
    token_ids: list[int]
    thoughts: list[str] = field(default_factory=list)  # the thought before each token ("" without thinking)
    thought_ids: list[list[int]] = field(default_factory=list)
    mix_weights: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0


def sample_next(logits: Tensor, temperature: float, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,): greedy when temperature == 0, else softmax(logits / T) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def think(qs: QuietStar, cache, position: int, generator=None) -> tuple[list[int], Tensor]:
    """QuietStar.think for one stream, the last real token (at `position`), one token at a time with the KV cache:
    <start> at position + 1, c_j at position + 1 + j, <end> at position + L + 2 -> (thought ids, h at <end>
    (1, 1, D)). The cache is restored afterwards: thoughts never become part of the text."""
    model, cfg = qs.model, qs.config
    device = model.embed_tokens.weight.device
    saved = list(cache.keys), list(cache.values)
    start, end = qs.marker_embeddings()
    x, ids = start.view(1, 1, -1), []
    for offset in range(1, qs.end_offset + 1):
        h = model.hidden(x, torch.tensor([position + offset], device=device), cache=cache)
        if offset <= cfg.thought_len:                       # h predicts c_offset
            logits = qs.thought_token_logits(h[:, -1]) / cfg.thought_temperature
            ids.append(sample_from_logits(logits, generator).item())
            x = model.embed(torch.tensor([[ids[-1]]], device=device))
        else:                                               # after c_L comes <end>
            x = end.view(1, 1, -1)
    cache.keys, cache.values = saved
    return ids, h


@torch.no_grad()
def decode(model: Mistral, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
           top_k: int | None = None, seed: int | None = None, qs: QuietStar | None = None,
           stop_at_eos: bool = True, stop: list[str] = ()) -> Generation:
    """The one decoding loop: continue `prompt` with a KV cache, thinking before every token when `qs` is given.
    Stops at EOS or once the continuation contains a `stop` string (cut off there)."""
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise UsageError("the prompt is empty: give at least one token of text to continue")
    cache = model.new_cache()
    h = model.hidden(model.embed(torch.tensor([prompt_ids], device=device)), cache=cache)[:, -1:]  # (1, 1, D)
    eos = set(model.config.eos_ids) if stop_at_eos else set()
    out = Generation("", [])
    started = time.time()
    for _ in range(max_new_tokens):
        h_next, thought, mix_weight = h, [], 0.0
        if qs is not None:
            thought, h_end = think(qs, cache, len(cache) - 1, generator)
            w = qs.mixing_head(h, h_end)
            h_next, mix_weight = mix(h, h_end, w), w.item()
        token = sample_next(model.lm_head(h_next)[:, -1], temperature, top_k, generator)    # (1,)
        if token.item() in eos:
            break
        out.token_ids.append(token.item())
        out.thoughts.append(tokenizer.decode(thought))
        out.thought_ids.append(thought)
        out.mix_weights.append(mix_weight)
        if stop and any(s in tokenizer.decode(out.token_ids) for s in stop):
            break
        h = model.hidden(model.embed(token[:, None]), cache=cache)                           # (1, 1, D)
    out.tokens_per_s = len(out.token_ids) / max(time.time() - started, 1e-9)
    out.text = tokenizer.decode(out.token_ids)
    for s in stop:
        out.text = out.text.split(s)[0]
    return out


def generate(model: Mistral, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, stop_at_eos: bool = True) -> str:
    """Plain decoding with any Mistral: the continuation's text. temperature 0 = greedy."""
    return decode(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed, None, stop_at_eos).text


def generate_with_thoughts(qs: QuietStar, tokenizer, prompt: str, max_new_tokens: int = 32,
                           temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                           thinking: bool = True, stop_at_eos: bool = True, stop: list[str] = ()) -> Generation:
    """Continue `prompt`, thinking before every token (thinking=False: plain decoding of qs.model)."""
    return decode(qs.model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed,
                  qs if thinking else None, stop_at_eos, stop)


def show(generation: Generation, tokenizer, color: bool) -> str:
    """The continuation with each thought inline before its token: dimmed on a terminal, else bracketed."""
    parts = []
    for token_id, thought in zip(generation.token_ids, generation.thoughts):
        shown = thought.replace("\n", "\\n")
        parts.append((f"\033[2m<{shown}>\033[0m" if color else f"[{shown}]") if thought else "")
        parts.append(tokenizer.decode([token_id]))
    return "".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--prompt", default="Q: Tom has 23 apples and finds 19 more. How many apples does Tom have?\\nA:",
                        help="text to continue; \\n is a newline (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=at_least(1), default=24, help="tokens to generate (default: 24)")
    parser.add_argument("--temperature", type=at_least(0.0, float), default=0.0,
                        help="0 = greedy, else sampling temperature (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="for sampled tokens and thoughts (default: 0)")
    parser.add_argument("--thinking", "--no-thinking", action=BoolFlag, default=True,
                        help="think before every token (--no-thinking: plain decoding) (default: on)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt.replace("\\n", "\n")
    try:
        if not prompt.strip():
            raise UsageError("--prompt is empty: give some text to continue")
        qs, tokenizer = load_model(args)
        gen = generate_with_thoughts(qs, tokenizer, prompt, args.max_new_tokens, args.temperature, seed=args.seed,
                                     thinking=args.thinking)
    except (UsageError, ValueError, OSError) as e:
        return fail(e)
    print(prompt + show(gen, tokenizer, color=sys.stdout.isatty()))
    weights = f", mean mixing weight {sum(gen.mix_weights) / max(1, len(gen.mix_weights)):+.3f}" if args.thinking else ""
    print(f"\n[{len(gen.token_ids)} tokens, {gen.tokens_per_s:.1f} tokens/s, thinking "
          f"{'on' if args.thinking else 'off'}{weights}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
