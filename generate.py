"""Text generation that thinks before every token: <start>, a sampled thought, <end>, then the mixed prediction.

    python generate.py --model=out --prompt="Q: Tom has 3 apples and buys 4 more. How many?\\nA:"

The real tokens keep a KV cache. Before each new token the thought branches off that cache (L + 2 one-token
passes at positions after the last real token) and is dropped afterwards, so a thought costs L + 2 cached
single-token passes, not a pass over the whole text as in the official evaluation script. The markers are
not in the vocabulary, so they can never be emitted (the official README's pitfall cannot happen).
"""

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

from model import encode, sample_next
from qstar import QuietStar, mix, sample_from_logits


@dataclass
class Generation:
    text: str                                         # the continuation
    token_ids: list[int]
    thoughts: list[str] = field(default_factory=list)  # the thought before each token ("" without thinking)
    thought_ids: list[list[int]] = field(default_factory=list)
    mix_weights: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0


@torch.no_grad()
def think(qs: QuietStar, cache, position: int, generator=None) -> tuple[list[int], torch.Tensor]:
    """Sample one thought after the last real token (at `position`) -> (thought ids, h at <end> (1, 1, D)).
    The cache is restored afterwards: thoughts never become part of the text."""
    model, cfg = qs.model, qs.config
    saved = list(cache.keys), list(cache.values)
    start, end = qs.marker_embeddings()
    x, ids = start.view(1, 1, -1), []
    for step in range(1, cfg.thought_len + 3):            # <start>, c_1 .. c_L, <end>
        h = model.hidden(x, torch.tensor([position + step]), cache=cache)
        if step == cfg.thought_len + 2:
            break
        if step <= cfg.thought_len:
            logits = model.lm_head(h[:, -1]).float() / cfg.thought_temperature
            ids.append(sample_from_logits(logits, generator).item())
            x = model.embed(torch.tensor([[ids[-1]]], device=h.device))
        else:
            x = end.view(1, 1, -1)
    cache.keys, cache.values = saved
    return ids, h


@torch.no_grad()
def generate_with_thoughts(qs: QuietStar, tokenizer, prompt: str, max_new_tokens: int = 32,
                           temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                           thinking: bool = True, stop_at_eos: bool = True, stop: list[str] = ()) -> Generation:
    """Continue `prompt`, thinking before every token (thinking=False: exactly model.generate). Stops at EOS
    or once the continuation contains a `stop` string (cut off there)."""
    model = qs.model
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    prompt_ids = encode(tokenizer, prompt)
    cache = model.new_cache()
    h = model.hidden(model.embed(torch.tensor([prompt_ids], device=device)), cache=cache)[:, -1:]  # (1, 1, D)
    eos = set(model.config.eos_ids) if stop_at_eos else set()
    out = Generation("", [])
    started = time.time()
    for _ in range(max_new_tokens):
        h_next, thought, weight = h, [], 0.0
        if thinking:
            thought, h_end = think(qs, cache, len(cache) - 1, generator)
            w = qs.mixing_head(h, h_end)
            h_next, weight = mix(h, h_end, w), w.item()
        token = sample_next(model.lm_head(h_next)[:, -1], temperature, top_k, generator)    # (1,)
        if token.item() in eos:
            break
        out.token_ids.append(token.item())
        out.thoughts.append(tokenizer.decode(thought))
        out.thought_ids.append(thought)
        out.mix_weights.append(weight)
        if stop and any(s in tokenizer.decode(out.token_ids) for s in stop):
            break
        h = model.hidden(model.embed(token[:, None]), cache=cache)                           # (1, 1, D)
    out.tokens_per_s = len(out.token_ids) / max(time.time() - started, 1e-9)
    out.text = tokenizer.decode(out.token_ids)
    for s in stop:
        out.text = out.text.split(s)[0]
    return out


def show(generation: Generation, tokenizer, color: bool) -> str:
    """The continuation with each thought inline before its token: dimmed on a terminal, else bracketed."""
    parts = []
    for token_id, thought in zip(generation.token_ids, generation.thoughts):
        shown = thought.replace("\n", "\\n")
        parts.append((f"\033[2m<{shown}>\033[0m" if color else f"[{shown}]") if thought else "")
        parts.append(tokenizer.decode([token_id]))
    return "".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="checkpoint folder or model name")
    parser.add_argument("--prompt", default="Q: Tom has 23 apples and finds 19 more. How many apples does Tom have?\nA:")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thinking", type=int, default=1, help="1: think before every token, 0: plain decoding")
    parser.add_argument("--thought_len", type=int, default=None, help="override the checkpoint's thought length")
    args = parser.parse_args(argv)
    overrides = {"thought_len": args.thought_len} if args.thought_len else {}
    qs, tokenizer = QuietStar.from_pretrained(args.model, **overrides)
    prompt = args.prompt.replace("\\n", "\n")
    gen = generate_with_thoughts(qs, tokenizer, prompt, args.max_new_tokens, args.temperature, seed=args.seed,
                                 thinking=bool(args.thinking))
    print(prompt + show(gen, tokenizer, color=sys.stdout.isatty()))
    print(f"\n[{len(gen.token_ids)} tokens, {gen.tokens_per_s:.1f} tokens/s, thinking {'on' if args.thinking else 'off'}"
          f"{f', mean mixing weight {sum(gen.mix_weights) / max(1, len(gen.mix_weights)):+.3f}' if args.thinking else ''}]")


if __name__ == "__main__":
    main()
