"""Benchmark: what thinking costs, in time and memory, against a plain language-model step.

    python -m machinery.bench            # the full grid (tiny and SmolLM2-135M dimensions, n up to 1024): ~40 min on 2 cores
    python -m machinery.bench --quick    # a small grid, under 2 minutes on 2 CPU cores
    python -m machinery.bench --think_at # SmolLM2 thinking at 10% of the positions against all of them: ~6 min

Notation: the official code's names, as its timings are quoted in them: k = n_ahead = L + 3, t = n_ahead_talk = N,
P = n_passes = M (README's L thought tokens, N true tokens, M thoughts per position).

A Quiet-STaR step with n_ahead k (k - 3 thought tokens between the markers), n_ahead_talk t and P thoughts per
position runs 1 + P * (k + t - 2) decoder passes of n tokens (one base pass shared by the P thoughts; the
official code runs P * (k + t - 1)). So the least it can cost is that many plain steps. A plain step pays for
AdamW once per pass, a Quiet-STaR step once for all its passes, so the honest ratio leaves the optimizer out of both:
    fwd+bwd  = (Quiet-STaR step - optimizer) / (passes x (plain step - optimizer))    (1.0 = exactly its passes)
and, beside it, the flattering one with the optimizer in both:
    overhead = Quiet-STaR step / (passes x plain step).
With activation checkpointing every layer's forward runs again in backward, whatever the model computes; the
`floor` column is that price on a plain step, (plain step with checkpointing - optimizer) / (plain step - optimizer),
so a checkpointed Quiet-STaR step is best read against it (1 where nothing is recomputed).
A step is forward, backward and AdamW on one document of n tokens. Both steps run in the same process (the
plain one before and after the Quiet-STaR one; the faster is kept), so the ratio is taken under one load.
Each configuration runs in its own process so that its peak memory (RSS on CPU, allocator peak on GPU) is
its own. Random weights: speed does not depend on their values. On the CPU, a profile of the k = 12 SmolLM2 steps
then splits a step's time into matmuls, attention kernels and all other ops, against `passes` plain steps: what
the gap to 1.0 is made of. The last line printed is JSON.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import fast
from machinery import gpu

SIZES = {
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=160),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                         rope_theta=100000.0, tie_embeddings=True),
}


def build(size: str, device):
    from model import Mistral, MistralConfig
    torch.manual_seed(0)
    model = Mistral(MistralConfig(**SIZES[size], sliding_window=None)).to(device)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


class Tokenizer1:
    """Stands in for a tokenizer: the markers start from token 1."""
    def encode(self, text, add_special_tokens=False):
        return type("Encoding", (), {"ids": [1]})()

    def decode(self, ids):
        return " ".join(map(str, ids))

    def get_added_tokens_decoder(self):
        return {}                                   # no special tokens to keep out of the thoughts


def peak_memory(device) -> float:
    """GiB: the allocator's peak on GPU, the process's peak resident set on CPU."""
    return gpu.peak_gib(device)


def timed(fn, device, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call. The first Quiet-STaR step of a process is
    slower by the page faults of memory it is the first to touch (at n = 256, k = 12: 69 s, then 59 and 55 s), a
    cost a training run pays once; so it is never the one timed."""
    fn()
    times = []
    for _ in range(repeats):
        gpu.synchronize(device)
        start = time.perf_counter()
        fn()
        gpu.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_step(size: str, n: int, k: int, t: int, P: int, checkpointing: bool, repeats: int, device) -> dict:
    """One configuration: plain step time (measured before and after the Quiet-STaR steps, so that a change of
    load on a shared machine hits both), Quiet-STaR step time, the optimizer's share, peak memory of each."""
    from qstar import QuietStar, QuietStarConfig
    model = build(size, device)
    tokens = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    plain_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def plain_step(optimizer=plain_optimizer):
        with autocast:
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain_checkpointed_step(optimizer=plain_optimizer):   # what recomputation costs a plain step
        model.activation_checkpointing = True
        try:
            plain_step(optimizer)
        finally:
            model.activation_checkpointing = False
    plain_times = [timed(plain_step, device, repeats)]
    plain_memory = peak_memory(device)
    checkpointed_times = [timed(plain_checkpointed_step, device, repeats)] if checkpointing else []
    gpu.reset_peak(device)

    qs = fast.use(QuietStar(model, QuietStarConfig(thought_len=k - 3, n_true=t, n_thoughts=P, marker_init="x",
                                                   activation_checkpointing=checkpointing), Tokenizer1()).to(device))
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.01)    # as after a few steps: every path live
    optimizer = torch.optim.AdamW(qs.parameters(), lr=1e-6)

    def qstar_step():
        with autocast:
            loss = qs(tokens)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    cheap = plain_times[0] * (k + t) * P < 40                                   # seconds, roughly
    qstar = timed(qstar_step, device, max(1, repeats // 2) if cheap else 1)
    qstar_memory = peak_memory(device)
    model.activation_checkpointing = False
    plain_times.append(timed(lambda: plain_step(optimizer), device, repeats))
    if checkpointing:
        checkpointed_times.append(timed(lambda: plain_checkpointed_step(optimizer), device, repeats))

    def optimizer_only():     # AdamW on gradients that exist: the part of a step that does not scale with passes
        optimizer.step()
    for p in qs.parameters():
        p.grad = torch.zeros_like(p)
    optimizer_s = timed(optimizer_only, device, repeats)
    plain = sorted(plain_times)[0]
    passes = 1 + P * (k + t - 2)
    plain_checkpointed = min(checkpointed_times) if checkpointing else None     # both: the faster of two
    floor = (plain_checkpointed - optimizer_s) / (plain - optimizer_s) if checkpointing else 1.0
    return {"size": size, "n": n, "k": k, "t": t, "P": P, "checkpointing": checkpointing, "passes": passes,
            "plain_s": plain, "plain_s_all": plain_times, "qstar_s": qstar, "optimizer_s": optimizer_s,
            "overhead": qstar / (passes * plain),
            "overhead_fwd_bwd": (qstar - optimizer_s) / (passes * (plain - optimizer_s)),
            "plain_checkpointed_s": plain_checkpointed, "plain_checkpointed_s_all": checkpointed_times,
            "checkpointing_floor": floor,
            "plain_tokens_per_s": n / plain, "qstar_tokens_per_s": n / qstar,
            "plain_peak_gib": plain_memory, "qstar_peak_gib": qstar_memory}


def think_at_floor(M: int, L: int, N: int, Q: float) -> float:
    """The least a step thinking at the fraction Q of positions can cost against one thinking at all of them, in
    passes' tokens: both run the base pass (1), then per thought <start> and the L thought tokens (L + 1 passes)
    and the N talk passes, which with think_at run at the chosen positions only, so
        (1 + M (L + 1 + N) Q) / (1 + M (L + 1 + N))."""
    return (1 + M * (L + 1 + N) * Q) / (1 + M * (L + 1 + N))


def think_at_model(size: str, k: int, t: int, P: int, device):
    """research.levers' QuietStar, whose forward reads config.think_at at every call (the paper's does not)."""
    from research.levers import LeverConfig, Levers
    qs = Levers(build(size, device), LeverConfig(thought_len=k - 3, n_true=t, n_thoughts=P, marker_init="x"),
                Tokenizer1()).to(device)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.01)
    return fast.use(qs)


def paths_model(size: str, k: int, t: int, P: int, device):
    """The paper's QuietStar on a random model, its mixing head live: the step both paths time."""
    from qstar import QuietStar, QuietStarConfig
    qs = QuietStar(build(size, device), QuietStarConfig(thought_len=k - 3, n_true=t, n_thoughts=P, marker_init="x"),
                   Tokenizer1()).to(device)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.01)
    return qs


def measure_paths(size: str, n: int, k: int, t: int, P: int, device) -> dict:
    """The two computations of one thinking step, train.py's --fast (fast.py's twins) and its default (qstar.py's
    plain path), on the same model and tokens: forward, backward and AdamW, each run once untimed, then timed in
    turn in one process (fast, plain, fast, plain: each the faster of its two). measure_path_memory: each one's peak
    memory, in a process of its own."""
    qs = paths_model(size, k, t, P, device)
    tokens = torch.randint(0, qs.model.config.vocab_size, (1, n), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    optimizer = torch.optim.AdamW(qs.parameters(), lr=1e-6)

    def step(fast_paths: bool):
        fast.use(qs, fast_paths)
        with autocast:
            loss = qs(tokens)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step(True), step(False)                                    # warm-up: the first touch of each path's memory
    times = {"fast": [], "plain": []}
    for name in ("fast", "plain") * 2:
        gpu.synchronize(device)
        start = time.perf_counter()
        step(name == "fast")
        gpu.synchronize(device)
        times[name].append(time.perf_counter() - start)
    fast_s, plain_s = min(times["fast"]), min(times["plain"])
    return {"size": size, "n": n, "k": k, "t": t, "P": P, "fast_s": fast_s, "plain_s": plain_s,
            "plain_over_fast": plain_s / fast_s, "times": times}


def measure_path_memory(size: str, n: int, k: int, t: int, P: int, fast_paths: bool, device) -> dict:
    """Peak memory of one thinking step on one path, alone in its process."""
    qs = fast.use(paths_model(size, k, t, P, device), fast_paths)
    tokens = torch.randint(0, qs.model.config.vocab_size, (1, n), device=device)
    gpu.reset_peak(device)
    qs(tokens)["loss"].backward()
    return {"size": size, "n": n, "k": k, "fast": fast_paths, "peak_gib": peak_memory(device)}


def measure_think_at(size: str, n: int, k: int, t: int, P: int, fraction: float, repeats: int, device) -> dict:
    """Thinking where it matters: one forward+backward (no optimizer) of a Quiet-STaR step thinking at every
    position and one thinking at the fraction Q of positions (think_at entropy:Q), same model, M, L, N and tokens,
    timed in turn in one process. The floor: think_at_floor, with Q the chosen fraction K / n."""
    qs = think_at_model(size, k, t, P, device)
    tokens = torch.randint(0, qs.model.config.vocab_size, (1, n), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(think_at: str):
        qs.config.think_at = think_at
        with autocast:
            loss = qs(tokens)["loss"]
        loss.backward()
        qs.zero_grad(set_to_none=True)
    times = {}
    for think_at in ("all", f"entropy:{fraction}", "all", f"entropy:{fraction}"):   # each twice, the faster kept
        times.setdefault(think_at, []).append(timed(lambda where=think_at: step(where), device, repeats))
    every, some = min(times["all"]), min(times[f"entropy:{fraction}"])
    L, K = k - 3, min(n - 1, max(1, math.ceil(fraction * (n - 1))))         # as qstar.select_positions
    return {"size": size, "n": n, "k": k, "t": t, "P": P, "fraction": fraction, "every_s": every, "some_s": some,
            "ratio": some / every, "floor": think_at_floor(P, L, t, K / n), "times": times}


def op_kind(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmuls"
    return "attention kernels" if "scaled_dot_product" in name else "other ops"


def where_time_goes(size: str, n: int, k: int, t: int, P: int, checkpointing: bool, device) -> dict:
    """Self time per kind of op (torch.profiler, CPU) of one Quiet-STaR forward+backward and of `passes` plain
    ones: which part of the step costs more than its passes. A separate process: profiling slows the step."""
    from torch.profiler import profile

    from qstar import QuietStar, QuietStarConfig
    model = build(size, device)
    tokens = torch.randint(0, model.config.vocab_size, (1, n), device=device)

    def plain_step():
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:]).backward()

    qs = fast.use(QuietStar(model, QuietStarConfig(thought_len=k - 3, n_true=t, n_thoughts=P, marker_init="x",
                                                   activation_checkpointing=checkpointing), Tokenizer1()).to(device))
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.01)
    passes = 1 + P * (k + t - 2)
    seconds = {}
    for name, fn, times in (("plain", plain_step, passes), ("qstar", lambda: qs(tokens)["loss"].backward(), 1)):
        model.activation_checkpointing = checkpointing and name == "qstar"
        fn()                                                           # warm-up
        with profile() as prof:
            fn()
        by_kind = {}
        for event in prof.key_averages():
            by_kind[op_kind(event.key)] = by_kind.get(op_kind(event.key), 0.0) + event.self_cpu_time_total / 1e6
        seconds[name] = {kind: value * times for kind, value in by_kind.items()}
    return {"size": size, "n": n, "k": k, "t": t, "P": P, "checkpointing": checkpointing, "passes": passes,
            "plain_x_passes_s": seconds["plain"], "qstar_s": seconds["qstar"]}


def attention_memory(n: int, step: int, P: int = 2) -> dict:
    """Bytes one thought pass's attention keeps for backward (one layer, SmolLM2 head sizes), fast vs dense,
    counted exactly with saved-tensor hooks (each storage once; the cache tensors it reads are not counted)."""
    from attention_mask import thought_mask
    from fast import thought_attention, with_summary_slot
    from model import attend
    H, K, E = 9, 3, 64
    q = torch.randn(P, H, n, E, requires_grad=True)
    new_k, new_v = torch.randn(P, K, n, E, requires_grad=True), torch.randn(P, K, n, E, requires_grad=True)
    past_k = [torch.randn(P, K, n, E) for _ in range(step - 1)]
    past_v = [torch.randn(P, K, n, E) for _ in range(step - 1)]
    real_k, real_v = torch.randn(1, K, n, E), torch.randn(1, K, n, E)
    real_k_aug = with_summary_slot(real_k).repeat_interleave(P, dim=0)     # as ThoughtCache.begin_thoughts
    real_v_aug = with_summary_slot(real_v).repeat_interleave(P, dim=0)
    inputs = {t.untyped_storage().data_ptr() for t in [q, new_k, new_v, *past_k, *past_v, real_k_aug, real_v_aug]}

    def kept(fn) -> tuple[int, float]:
        storages = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in inputs:
                storages[ptr] = t.untyped_storage().nbytes()
            return t
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.sum().backward()
        return sum(storages.values()), time.perf_counter() - start

    fast = kept(lambda: thought_attention(q, [*past_k, new_k], [*past_v, new_v], real_k_aug, real_v_aug, P, None))

    def dense():
        keys = torch.cat([real_k.expand(P, -1, -1, -1), *past_k, new_k], dim=2)        # (P, K, n(s+1), E)
        values = torch.cat([real_v.expand(P, -1, -1, -1), *past_v, new_v], dim=2)
        return attend(q, keys, values, thought_mask(n, step))
    dense_result = kept(dense)
    return {"n": n, "step": step, "fast_mib": fast[0] / 2**20, "dense_mib": dense_result[0] / 2**20,
            "fast_ms": fast[1] * 1e3, "dense_ms": dense_result[1] * 1e3}


def generation_speed(size: str, k: int, new_tokens: int, device) -> dict:
    from generate import generate_with_thoughts
    from qstar import QuietStar, QuietStarConfig
    model = build(size, device)
    qs = QuietStar(model, QuietStarConfig(thought_len=k - 3, marker_init="x"), Tokenizer1()).to(device)
    tok = Tokenizer1()
    tok.encode = lambda text, add_special_tokens=True: type("E", (), {"ids": list(range(2, 34))})()
    speeds = {}
    for thinking in (False, True):
        gen = generate_with_thoughts(qs, tok, "", new_tokens, thinking=thinking, stop_at_eos=False)
        speeds["thinking" if thinking else "plain"] = gen.tokens_per_s
    return {"size": size, "k": k, "plain_tokens_per_s": speeds["plain"], "thinking_tokens_per_s": speeds["thinking"],
            "slowdown": speeds["plain"] / speeds["thinking"], "passes_per_token": k}


def find_jemalloc() -> str | None:
    """jemalloc (Debian: apt install libjemalloc2). On CPU, glibc's malloc fragments under the many large,
    short-lived tensors of a training step: here it nearly doubles peak RSS and adds page-fault time. PyTorch's
    CPU performance guide recommends jemalloc or tcmalloc; both steps of a comparison use the same allocator."""
    import ctypes.util
    import glob
    candidates = glob.glob("/usr/lib/*-linux-gnu/libjemalloc.so.2") + [ctypes.util.find_library("jemalloc") or ""]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def run_child(kind: str, allocator: str | None = None, **kwargs) -> dict:
    """Run one measurement in a fresh process (its own peak memory) and read back its JSON line."""
    env = os.environ | ({"LD_PRELOAD": allocator} if allocator else {})
    proc = subprocess.run([sys.executable, "-m", "machinery.bench", f"--child={json.dumps({'kind': kind, **kwargs})}"],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return {"kind": kind, **kwargs, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_paths(shape: tuple, allocator) -> None:
    size, n, k = shape
    print(f"A thinking step with --fast and without ({size}, n {n}, k {k}, t 4, P 2, {torch.get_num_threads()} "
          "threads; forward, backward, AdamW; time alternated in one process, memory one process each)")
    r = run_child("paths", allocator, size=size, n=n, k=k, t=4, P=2)
    if "error" in r:
        raise SystemExit(f"failed: {r['error']}")
    for fast_paths in (True, False):
        m = run_child("path_memory", allocator, size=size, n=n, k=k, t=4, P=2, fast_paths=fast_paths)
        r[f"{'fast' if fast_paths else 'plain'}_peak_gib"] = m.get("peak_gib")
    print(f"fast {r['fast_s']:.2f} s, plain {r['plain_s']:.2f} s: plain / fast x{r['plain_over_fast']:.3f}; "
          f"peak {r['fast_peak_gib']:.2f} GiB fast, {r['plain_peak_gib']:.2f} GiB plain")
    print(json.dumps(r))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small grid that runs in under 2 minutes")
    parser.add_argument("--think_at", action="store_true", help="only the think_at entropy:0.1 against all table")
    parser.add_argument("--paths", action="store_true", help="only a thinking step with --fast against without it "
                        "(SmolLM2-135M, n 128, k 12, t 4, P 2; --quick: the tiny model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allocator", default="auto", choices=["auto", "jemalloc", "glibc"],
                        help="CPU memory allocator of the measuring processes (auto: jemalloc if installed)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    allocator = None if args.allocator == "glibc" or device.type == "cuda" else find_jemalloc()
    if args.allocator == "jemalloc" and allocator is None:
        raise SystemExit("--allocator=jemalloc: libjemalloc.so.2 not found (Debian: apt install libjemalloc2)")
    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        if kind == "step":
            print(json.dumps(measure_step(**spec, device=device)))
        elif kind == "profile":
            print(json.dumps(where_time_goes(**spec, device=device)))
        elif kind == "think_at":
            print(json.dumps(measure_think_at(**spec, device=device)))
        elif kind == "paths":
            print(json.dumps(measure_paths(**spec, device=device)))
        elif kind == "path_memory":
            print(json.dumps(measure_path_memory(**spec, device=device)))
        else:
            print(json.dumps(generation_speed(**spec, device=device)))
        return

    if args.quick:
        steps = [("tiny", n, k, False) for n in (128, 256) for k in (4, 12)] + [("tiny", 256, 12, True),
                                                                               ("smollm2-135m", 128, 4, False)]
        attention = [(n, s) for n in (128, 256, 512) for s in (1, 11)]
        generation = [("tiny", 12)]
        profiles = [("tiny", 128, 12, False)]
        think_at = [("tiny", 256, 12)]
        repeats = 3
    else:
        # SmolLM2 without checkpointing where it fits in 24 GiB (n=256, k=12: 14.2 GiB); with it beyond
        steps = [("tiny", n, k, False) for n in (128, 256, 512, 1024) for k in (4, 8, 12)]
        steps += [("smollm2-135m", n, k, False) for n in (128, 256) for k in (4, 12)]
        steps += [("smollm2-135m", n, 12, True) for n in (256, 512, 1024)]
        attention = [(n, s) for n in (128, 256, 512, 1024) for s in (1, 6, 11)]
        generation = [("smollm2-135m", 4), ("smollm2-135m", 12)]
        think_at = [("smollm2-135m", 64, 12), ("smollm2-135m", 128, 12)]
        profiles = [("smollm2-135m", 256, 12, False), ("smollm2-135m", 256, 12, True), ("smollm2-135m", 1024, 12, True)]
        repeats = 3
    if args.think_at:                                  # only that table
        steps, profiles, attention, generation = [], [], [], []
    if args.paths:
        return compare_paths(("tiny", 128, 12) if args.quick else ("smollm2-135m", 128, 12), allocator)

    figures = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "allocator": "jemalloc" if allocator else "default",
               "steps": [], "profiles": [], "attention": [], "generation": [], "think_at": [], "overhead": {},
               "overhead_fwd_bwd": {}}
    if steps:
        print(f"Quiet-STaR training step vs plain step ({device}, {torch.get_num_threads()} threads, allocator "
              f"{figures['allocator']}; t=4, P=2, 1 document)")
        print("floor: a plain step's fwd+bwd with checkpointing over without it: what recomputation costs before thinking")
        print(f"{'size':13} {'n':>5} {'k':>3} {'ckpt':>4} {'passes':>6} {'fwd+bwd':>8} {'floor':>6} {'overhead':>8} "
              f"{'plain s':>8} {'qstar s':>8} {'tok/s':>7} {'plain GiB':>9} {'qstar GiB':>9}")
    for size, n, k, checkpointing in steps:
        r = run_child("step", allocator, size=size, n=n, k=k, t=4, P=2, checkpointing=checkpointing, repeats=repeats)
        figures["steps"].append(r)
        if "error" in r:
            print(f"{size:13} {n:>5} {k:>3} {'yes' if checkpointing else 'no':>4}  failed: {r['error']}")
            continue
        key = f"{size}/n{n}/k{k}" + ("/ckpt" if checkpointing else "")
        figures["overhead"][key] = round(r["overhead"], 4)
        figures["overhead_fwd_bwd"][key] = round(r["overhead_fwd_bwd"], 4)
        print(f"{size:13} {n:>5} {k:>3} {'yes' if checkpointing else 'no':>4} {r['passes']:>6} "
              f"{r['overhead_fwd_bwd']:>8.3f} {r['checkpointing_floor']:>6.3f} {r['overhead']:>8.3f} "
              f"{r['plain_s']:>8.3f} {r['qstar_s']:>8.2f} "
              f"{r['qstar_tokens_per_s']:>7.1f} {r['plain_peak_gib']:>9.2f} {r['qstar_peak_gib']:>9.2f}")

    if device.type == "cpu" and profiles:
        print("\nWhere the time goes: profiler self time (s) of one forward+backward, no optimizer; the profiler "
              "adds a little to each op")
        print(f"{'size':13} {'n':>5} {'k':>3} {'ckpt':>4} {'':17} {'qstar':>8} {'passes x plain':>14} {'ratio':>6}")
        for size, n, k, checkpointing in profiles:
            r = run_child("profile", allocator, size=size, n=n, k=k, t=4, P=2, checkpointing=checkpointing)
            figures["profiles"].append(r)
            if "error" in r:
                print(f"{size:13} {n:>5} {k:>3} {'yes' if checkpointing else 'no':>4}  failed: {r['error']}")
                continue
            for kind in ("matmuls", "attention kernels", "other ops", "total"):
                q, plain = ((sum(d.values()) if kind == "total" else d.get(kind, 0.0))
                            for d in (r["qstar_s"], r["plain_x_passes_s"]))
                print(f"{size:13} {n:>5} {k:>3} {'yes' if checkpointing else 'no':>4} {kind:>17} {q:>8.2f} "
                      f"{plain:>14.2f} {q / plain:>6.3f}")

    print(f"\nThinking where it matters ({device}, {torch.get_num_threads()} threads): fwd+bwd of a step thinking at "
          "the fraction Q = 0.1 of positions (think_at entropy:0.1) over one thinking at all of them, t=4, P=2; "
          "floor = (1 + M (L+1+N) Q) / (1 + M (L+1+N)), Q the chosen fraction ceil(0.1 (n-1)) / n")
    print(f"{'size':13} {'n':>5} {'k':>3} {'Q=1 s':>8} {'Q=0.1 s':>8} {'ratio':>6} {'floor':>6}")
    for size, n, k in think_at:
        r = run_child("think_at", allocator, size=size, n=n, k=k, t=4, P=2, fraction=0.1, repeats=1)
        figures["think_at"].append(r)
        if "error" in r:
            print(f"{size:13} {n:>5} {k:>3}  failed: {r['error']}")
            continue
        print(f"{size:13} {n:>5} {k:>3} {r['every_s']:>8.2f} {r['some_s']:>8.2f} {r['ratio']:>6.3f} {r['floor']:>6.3f}")

    if attention:
        print("\nAttention of one thought pass, one layer (9 query / 3 KV heads of 64, P=2): memory kept for backward")
        print(f"{'n':>5} {'step':>4} {'fast MiB':>9} {'dense MiB':>10} {'fast ms':>8} {'dense ms':>9}")
    for n, s in attention:
        r = attention_memory(n, s)
        figures["attention"].append(r)
        print(f"{n:>5} {s:>4} {r['fast_mib']:>9.2f} {r['dense_mib']:>10.2f} {r['fast_ms']:>8.1f} {r['dense_ms']:>9.1f}")

    if generation:
        print("\nGeneration (32-token prompt, 32 new tokens; thinking = k - 1 extra cached passes per token)")
    for size, k in generation:
        r = run_child("generation", allocator, size=size, k=k, new_tokens=32 if not args.quick else 12)
        figures["generation"].append(r)
        if "error" in r:
            print(f"{size:13} k={k:<3} failed: {r['error']}")
            continue
        print(f"{size:13} k={k:<3} plain {r['plain_tokens_per_s']:7.1f} tok/s   thinking "
              f"{r['thinking_tokens_per_s']:7.1f} tok/s   ({r['slowdown']:.1f}x slower)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
