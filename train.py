"""Train Quiet-STaR, top to bottom: settings, data, model, optimizer, one step, evaluation, the loop, main.
The machinery around a run (command line, Ctrl-C, checkpoints, resume, torchrun) is in machinery/run.py.

    python train.py                                # CPU quick start: SmolLM2-135M, built-in arithmetic text
    python train.py --preset smoke                 # the whole loop in about a minute: the run to step through
    python train.py --preset answers               # thoughts before bare answers (research/levers.py; README)
    python train.py --data ../shared/data/gsm8k/train.jsonl --max_steps 200
    python train.py --preset paper --lora_rank 16  # one GPU: Mistral-7B, the official hyperparameters
    python train.py --out_dir out --resume         # continue a run exactly where its checkpoint left it
    python train.py --fast                         # fast.py's twins: equal step by step, about 7% faster
    python train.py --help                         # every option, its default and what it does

Every field of TrainConfig (below) and of qstar.QuietStarConfig is an option.
"""

import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

import fast
from data import ProblemWindows, TokenWindows, arithmetic_texts, bare_answer_spans, filler_token_id, parse_kinds, \
    read_texts
from eval import evaluation_row
from machinery import gpu, parallel
from machinery.checkpoint import crash_point, latest_checkpoint, verify_manifest
from machinery.cli import UsageError, check, fail
from machinery.hf_io import load_model_folder, load_pretrained, load_quietstar_parts
from machinery.run import (MetricsLog, Run, StopRequest, describe, finish, format_eval, gradient_split, interrupted,
                           launch, lock_run_folder, resume_optimizer, save_checkpoint, say, start_run, stop_on_nan)
from machinery.run import build_parser as build_run_parser
from machinery.run import parse_args as parse_run_args
from qstar import QuietStar
from research.content import answer_row, content_reward, oracle_thoughts
from research.levers import LeverConfig, Levers, build

# ---- 1. settings ------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    preset: str = "cpu"             # cpu: the default run; smoke: a minute; think, entropy, answers: bare answers; paper: 7B
    model: str = "smollm2-135m"     # built-in short name, a local Hugging Face folder or a Hub id
    data: str = "arithmetic"        # arithmetic (built in) | a .txt or .jsonl file | a Hub dataset name
    bare_fraction: float = 0.0      # arithmetic: the fraction of problems answered bare ("A: 47.") instead of worked
    problems: str = "all"           # arithmetic: all, or a comma list of add, sub, mul, multi (a + b * c - d)
    out_dir: str = "out"            # run folder: checkpoint-N/ (Hugging Face layout), latest, metrics.jsonl, thoughts.html
    resume: bool = False            # continue the run saved in out_dir
    max_steps: int = 40             # optimizer steps in all (plain and thinking)
    plain_steps: int = 0            # the first steps train next-token prediction only (no thoughts): cheap format learning
    plain_batch_size: int = 0       # windows per micro-batch in those steps; 0 = batch_size
    think_windows: str = "packed"   # thinking steps' windows: packed (consecutive text) | problem (one document each)
    think_bare_fraction: float | None = None   # arithmetic: bare fraction in the thinking steps; None = bare_fraction
    forced_steps: int = 0           # warm start: the first thinking steps force the worked step at answer positions
    forced_decay: int = 0           # ... then the forced fraction falls linearly to 0 over this many steps
    start_policy: str = ""          # --kl_to_start: the run whose latest checkpoint is the policy to stay near
    batch_size: int = 2             # windows of text per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    seq_len: int = 64               # tokens per window
    lr: float = 2e-5                # base model (or LoRA) learning rate
    lr_mixing_head: float = 1e-3    # the mixing head starts at zero and must learn fast
    lr_markers: float = 1e-3        # on the stored markers, i.e. x marker_grad_scale in embedding space
    weight_decay: float = 0.001     # official value; none on norms, biases and markers
    warmup_steps: int = 5           # linear warm-up at the start of each phase, then constant (as the official run)
    mixing_delay: int = 0           # thinking steps before the mixing head learns (the post-thought prediction first)
    grad_clip: float = 1.0          # global gradient-norm clip
    eval_interval: int = 20         # steps between held-out evaluations (also at the start and the end)
    eval_windows: int = 8           # held-out windows per evaluation
    eval_answers: int = 32          # held-out bare answers per evaluation (arithmetic with bare_fraction > 0)
    save_interval: int = 20         # steps between checkpoints (also at the end, on Ctrl-C and on SIGTERM)
    grad_split_interval: int = 10   # thinking steps between logs of the NLL / REINFORCE gradient norms (0 = never)
    lora_rank: int = 0              # 0 = full fine-tuning; > 0 = LoRA adapters on the base model
    lora_alpha: float = 32.0        # LoRA scale alpha / rank
    device: str = "auto"            # auto = cuda if available, else cpu
    parallel: str = "none"          # under torchrun: ddp (whole model on every rank) | fsdp (sharded, FSDP2) | none
    dist_timeout: int = 1800        # seconds a rank waits for the others (a failed rank) before stopping with an error
    seed: int = 1337                # data order, thought samples and initialisation
    threads: int = 0                # CPU threads for torch; 0 = torch's default
    fast: bool = False              # qstar.py's plain path, the one the README teaches (about 7% slower per step);
                                    # --fast: fast.py's equal twins

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_windows", "eval_answers",
                     "save_interval"):
            check(getattr(self, name) >= 1, f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("plain_batch_size", "grad_split_interval", "lora_rank", "threads", "warmup_steps", "mixing_delay",
                     "lr", "lr_mixing_head", "lr_markers", "weight_decay", "forced_steps", "forced_decay"):
            check(getattr(self, name) >= 0, f"--{name} must be 0 or more, got {getattr(self, name)}")
        check(self.seq_len >= 2, f"--seq_len must be at least 2 (a token and its successor), got {self.seq_len}")
        check(0 <= self.plain_steps <= self.max_steps,
              f"--plain_steps must be between 0 and --max_steps ({self.max_steps}), got {self.plain_steps}")
        for name in ("bare_fraction", "think_bare_fraction"):
            value = getattr(self, name)
            check(value is None or 0 <= value <= 1, f"--{name} must be between 0 and 1, got {value}")
        check(self.think_windows in ("packed", "problem"), f"--think_windows must be packed or problem, "
              f"got {self.think_windows!r}")
        parse_kinds(self.problems)
        check(self.grad_clip > 0, f"--grad_clip must be positive (the largest gradient norm), got {self.grad_clip}")
        check(self.lora_alpha > 0, f"--lora_alpha must be positive, got {self.lora_alpha}")
        check(self.parallel in ("none", "ddp", "fsdp"), f"--parallel must be none, ddp or fsdp, got {self.parallel!r}")
        check(self.dist_timeout >= 1, f"--dist_timeout must be at least 1 second, got {self.dist_timeout}")
        check(not (self.parallel == "fsdp" and self.lora_rank), "--parallel fsdp with --lora_rank is not supported: "
              "LoRA's adapters fit on every GPU, use --parallel ddp")


PRESETS = {
    # The default run: short thoughts, so that it fits in 10 to 30 minutes on 2 CPU cores (README).
    "cpu": dict(thought_len=4, n_true=2, n_thoughts=2),
    # The whole loop (base pass, thoughts, talk, reward, learning, an evaluation with its controls, a checkpoint,
    # the thoughts page) in about a minute and under 2 GB: LoRA on the 135M model, tiny windows and thoughts.
    "smoke": dict(max_steps=3, plain_steps=1, batch_size=1, seq_len=24, thought_len=2, n_true=1, n_thoughts=2,
                  lora_rank=4, lr=1e-3, eval_interval=3, eval_windows=2, save_interval=3,
                  warmup_steps=1, grad_split_interval=0),
    # Thinking aimed at bare answers (README, "Does thinking help?"): half the problems are answered bare
    # ("A: 47."), half worked ("A: 4*6=24. 23+24=47. ..."); 200 cheap plain steps teach the worked format; then 60
    # Quiet-STaR steps with thoughts long enough to hold one equation, rewarded on the next 4 tokens (both digits).
    # Measured: it does not make thinking win on the CPU (the README has the table and the reasons).
    "think": dict(bare_fraction=0.5, plain_steps=200, plain_batch_size=8, max_steps=260, batch_size=2, seq_len=64,
                  lr=1e-4, lr_mixing_head=1e-3, lr_markers=1e-5, policy_weight=10.0, thought_len=12, n_true=4,
                  n_thoughts=2, eval_interval=130, eval_windows=4, eval_answers=16, save_interval=50),
    # Thinking where the least sure 20% of positions are (docs/results.md): 4 thoughts there, rewarded by the
    # post-thought prediction alone (RLP), which learns to continue a thought (NLL 0.5); a mixing weight in [0, 1].
    # Measured: wins in one seed of three, so it does not make content help reliably.
    "entropy": dict(bare_fraction=0.5, plain_steps=60, plain_batch_size=8, max_steps=110, batch_size=2, lr=1e-4,
                    lr_markers=1e-4, think_at="entropy:0.2", n_thoughts=4, thought_len=12, n_true=4,
                    reward_from="post", post_nll_weight=0.5, bounded_mixing=True, eval_interval=25,
                    eval_windows=4, eval_answers=64, save_interval=25),
    # Thoughts where the answers are (research/levers.py; docs/results.md): after the plain phase, windows of one
    # bare problem each, a thought before every digit of the answer, 8 thoughts there sampled at temperature 0.5
    # with a leave-one-out baseline, negative advantages kept; the answers' digits are learnt only after a thought;
    # a warm start forces the worked step ("23+19=42....") for 10 steps, then fades over 10; the post-thought
    # prediction is the reward and learns by its own NLL; w >= 0.05, learnt from the model's own thoughts only.
    "answers": dict(bare_fraction=0.5, plain_steps=60, plain_batch_size=8, max_steps=90, batch_size=8, lr=1e-4,
                    lr_markers=1e-4, think_windows="problem", think_bare_fraction=1.0, think_at="digits",
                    base_learns_answers=False, thought_temperature=0.5, oracle_padding="end",
                    n_thoughts=8, thought_len=10, n_true=4, forced_steps=10, forced_decay=10, baseline="loo",
                    group_std=True, clip_negative_advantage=False, reward_from="post", post_nll_weight=0.5,
                    bounded_mixing=True, mixing_floor=0.05, mixing_from_forced=False, eval_interval=15,
                    eval_windows=2, eval_answers=32, save_interval=15, fast=True),
    # The authors' run (docs/official_code.md): Mistral-7B-v0.1, OpenWebMath, 256-token windows, 8 documents per
    # step, n_ahead 12 (9 thought tokens), n_ahead_talk 4, n_passes 2, lr 1e-6, 20 warm-up steps, ~100 steps.
    "paper": dict(model="mistralai/Mistral-7B-v0.1", data="open-web-math/open-web-math", max_steps=100,
                  batch_size=4, grad_accum=2, seq_len=256, lr=1e-6, lr_mixing_head=1e-6, lr_markers=1e-6,
                  weight_decay=0.001, warmup_steps=20, eval_interval=10, save_interval=100, eval_windows=32,
                  thought_len=9, n_true=4, n_thoughts=2, activation_checkpointing=True, fast=True),
}
# Settings a resumed run cannot change: they define the model, its parameters or the thought's shape. The thought's
# may change while the checkpoint is still in the plain phase: then several thinking recipes can share one.
FIXED_ON_RESUME = ("model", "lora_rank", "lora_alpha", "thought_len", "n_thoughts", "n_true", "marker_init",
                   "marker_grad_scale", "mixing_hidden", "bounded_mixing", "preset")
FREE_IN_PLAIN_PHASE = ("thought_len", "n_thoughts", "n_true", "bounded_mixing")

def build_parser():
    return build_run_parser(TrainConfig, __doc__)


def parse_args(argv: list[str]) -> tuple[TrainConfig, LeverConfig, list[str]]:
    """Defaults < preset < (on --resume: the run's saved settings) < what the user typed (machinery/run.py)."""
    return parse_run_args(argv, TrainConfig, PRESETS, FIXED_ON_RESUME, __doc__, FREE_IN_PLAIN_PHASE)


# ---- 2. data -------------------------------------------------------------------------------------------------

def read_documents(cfg: TrainConfig) -> tuple[list[str], list[str], list[str]]:
    """-> training, thinking-phase and held-out documents: the built-in arithmetic problems (seeds seed, seed + 2
    and seed + 1), or the documents of --data with the last 5% held out. Read before anything is written, so that
    bad data fails fast."""
    if cfg.data == "arithmetic":
        bare = cfg.bare_fraction if cfg.think_bare_fraction is None else cfg.think_bare_fraction
        train = arithmetic_texts(4000, seed=cfg.seed, bare_fraction=cfg.bare_fraction, kinds=cfg.problems)
        think = train if bare == cfg.bare_fraction else \
            arithmetic_texts(4000, seed=cfg.seed + 2, bare_fraction=bare, kinds=cfg.problems)
        return train, think, arithmetic_texts(400, seed=cfg.seed + 1, bare_fraction=cfg.bare_fraction,
                                              kinds=cfg.problems)
    texts = read_texts(cfg.data)
    if len(texts) < 2:
        raise UsageError(f"--data {cfg.data} has {len(texts)} document; train.py needs at least 2 (the last "
                         "5% of the documents are held out for evaluation)")
    n_val = max(1, len(texts) // 20)
    return texts[:-n_val], texts[:-n_val], texts[-n_val:]


def load_data(cfg: TrainConfig, documents, tokenizer, eos: int | None):
    """-> the plain and the thinking steps' windows (the same unless --think_windows problem or
    --think_bare_fraction), and the held-out sets {name: (windows, focus)}: consecutive windows ("text") and, for
    bare-answer arithmetic, windows aligned on the answers ("answer")."""
    train_texts, think_texts, val_texts = documents
    focus = bare_answer_spans if cfg.data == "arithmetic" else None
    name = f"--data {cfg.data} (training part)"
    train = TokenWindows(train_texts, tokenizer, cfg.seq_len, eos, cfg.seed, focus=focus, name=name)
    think = train if think_texts is train_texts and cfg.think_windows == "packed" else \
        (ProblemWindows if cfg.think_windows == "problem" else TokenWindows)(
            think_texts, tokenizer, cfg.seq_len, eos, cfg.seed, focus=focus, name=name)
    held_out = TokenWindows(val_texts, tokenizer, cfg.seq_len, eos, cfg.seed, focus=focus,
                            name=f"--data {cfg.data} (held-out part: the last {len(val_texts)} documents)")
    val = {"text": held_out.windows(cfg.eval_windows)}
    if cfg.data == "arithmetic" and cfg.bare_fraction > 0:
        val["answer"] = held_out.focus_windows(cfg.eval_answers)
    return train, think, val


# ---- 3. model ------------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, qcfg: LeverConfig, device, use_bf16: bool, checkpoint: Path | None):
    """The base model (full fine-tuning: from the checkpoint when resuming; LoRA: the frozen base in bf16 on GPU
    plus adapters) wrapped in QuietStar; when resuming, the trained markers and mixing head exactly as saved."""
    torch.manual_seed(cfg.seed)
    base_dtype = torch.bfloat16 if cfg.lora_rank and use_bf16 else torch.float32
    if checkpoint is not None and not cfg.lora_rank:            # resuming: the trained weights, already verified
        model, tokenizer = load_model_folder(checkpoint, dtype=base_dtype, device=device)
    else:
        model, tokenizer = load_pretrained(cfg.model, dtype=base_dtype, device=device)
    if cfg.lora_rank:
        from machinery.lora import add_lora, load_adapters
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        model.to(device)
        if checkpoint is not None:
            load_adapters(model, checkpoint)
    qs = build(model, qcfg, tokenizer).to(device)        # the paper's QuietStar unless a research lever is on
    if checkpoint is not None:
        load_quietstar_parts(qs, checkpoint)
    fast.use(qs, cfg.fast)                                # the fast twins (fast.py), or the plain path
    return qs.train(), tokenizer


def start_policy(cfg: TrainConfig, qcfg: LeverConfig, device, use_bf16: bool) -> QuietStar:
    """--kl_to_start's frozen reference: the policy of --start_policy's latest checkpoint (the plain phase's run
    the thinking phase was copied from), loaded as the model is; resuming a thinking run needs nothing else."""
    check(cfg.start_policy, "--kl_to_start needs --start_policy DIR: the run whose latest checkpoint holds the policy "
          "the thinking phase starts from (e.g. the plain phase's run)")
    folder = latest_checkpoint(Path(cfg.start_policy))
    check(folder is not None and folder.is_dir(), f"--start_policy {cfg.start_policy} holds no checkpoint")
    policy, _ = build_model(cfg, qcfg, device, use_bf16, verify_manifest(folder))
    return policy.eval().requires_grad_(False)


# ---- 4. optimizer --------------------------------------------------------------------------------------------

def param_groups(qs: QuietStar, cfg: TrainConfig) -> list[dict]:
    """Five groups: base weights and base norms/biases (lr), the mixing head's weights and biases
    (lr_mixing_head, which starts at zero and must learn fast), the markers (lr_markers). No weight decay on
    vectors or markers. Each group carries its name, so settings changed on --resume find their group."""
    base = [p for p in qs.model.parameters() if p.requires_grad]
    mixing = list(qs.mixing_head.parameters())
    groups = [("base", [p for p in base if p.dim() >= 2]), ("base_vectors", [p for p in base if p.dim() < 2]),
              ("mixing_head", [p for p in mixing if p.dim() >= 2]),
              ("mixing_head_vectors", [p for p in mixing if p.dim() < 2]), ("markers", list(qs.markers.parameters()))]
    return [{"name": name, "params": params, **group_settings(name, cfg)} for name, params in groups if params]


def group_settings(name: str, cfg: TrainConfig) -> dict:
    lr = {"base": cfg.lr, "base_vectors": cfg.lr, "mixing_head": cfg.lr_mixing_head,
          "mixing_head_vectors": cfg.lr_mixing_head, "markers": cfg.lr_markers}[name]
    decay = cfg.weight_decay if name in ("base", "mixing_head") else 0.0
    return {"lr": lr, "base_lr": lr, "weight_decay": decay}


# ---- 5. one step, and evaluation ---------------------------------------------------------------------------

def forced_fraction(cfg: TrainConfig, thinking_step: int) -> float:
    """The warm start's schedule: 1 for the first forced_steps thinking steps, then falling linearly to 0 over
    forced_decay steps (thinking_step counts from 0)."""
    if thinking_step < cfg.forced_steps:
        return 1.0
    return max(0.0, 1.0 - (thinking_step - cfg.forced_steps + 1) / (cfg.forced_decay + 1))


def step_inputs(run: Run, batch: dict, thinking: bool) -> dict:
    """A batch's tensors for the step: tokens, loss_mask; for Levers also where the bare answers start and, during
    the warm start, the worked-step thought before them (eval.oracle_thoughts)."""
    to = lambda x: torch.from_numpy(x).to(run.device)                               # noqa: E731
    inputs = {"tokens": to(batch["tokens"]), "loss_mask": to(batch["loss_mask"]) if "loss_mask" in batch else None}
    if thinking and isinstance(run.qs, Levers):
        focus = batch["focus"]                                                     # (B, T): answer digits
        inputs["answer_start"] = to(focus & ~np.pad(focus, ((0, 0), (1, 0)))[:, :-1])   # their first digits
        inputs["answer_digits"] = to(focus)
        if run.qs.forced_fraction > 0:
            inputs["oracle"] = oracle_thoughts(run.tokenizer, torch.from_numpy(batch["tokens"]),
                                               torch.from_numpy(focus[:, 1:]), run.qs.config.thought_len,
                                               run.filler_id, run.qs.config.oracle_padding)[0].to(run.device)
    return inputs


def train_step(run: Run, step: int) -> dict:
    """One optimizer step (plain or thinking) -> its metrics row, or a row with "nonfinite" if a loss or the
    gradient is not finite on any rank. Rank r takes its block of the global batch (machinery/parallel.py)."""
    cfg, ranks, t0 = run.cfg, run.ranks, time.time()
    thinking = step >= cfg.plain_steps                  # the first plain_steps: next-token training only
    batch_size = cfg.batch_size if thinking else cfg.plain_batch_size or cfg.batch_size
    lr_scale = min(1.0, (step - (cfg.plain_steps if thinking else 0) + 1) / max(1, cfg.warmup_steps))
    mixing_waits = thinking and step - cfg.plain_steps < cfg.mixing_delay     # w would fall while thoughts derail
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_scale
    if isinstance(run.qs, Levers):
        run.qs.forced_fraction = forced_fraction(cfg, step - cfg.plain_steps) if thinking else 0.0
    parts, split = {}, {}
    for micro in range(cfg.grad_accum):
        torch.manual_seed(cfg.seed * 1_000_003 + step * cfg.grad_accum + micro)   # resumable sampling
        data = run.think_data if thinking else run.train_data
        batch = data.batch(step * cfg.grad_accum + micro, batch_size * ranks.world)   # the global batch
        batch = {k: v[ranks.rank * batch_size:(ranks.rank + 1) * batch_size] for k, v in batch.items()}
        with run.autocast():
            out = run.step_module(**step_inputs(run, batch, thinking), think=thinking)
        if parallel.any_rank(not torch.isfinite(out["loss"]), ranks):
            return {"step": step + 1, "nonfinite": {k: float(v.detach()) for k, v in out.items()}}
        if thinking and micro == 0 and ranks.mode == "none" and cfg.grad_split_interval and \
                (step - cfg.plain_steps) % cfg.grad_split_interval == 0:
            split = gradient_split(run.qs, out)
        (out["loss"] / cfg.grad_accum).backward()
        for k, v in out.items():
            if k != "policy_term":
                parts[k] = parts.get(k, 0.0) + v.item() / cfg.grad_accum
    if mixing_waits:                    # no gradient, so Adam neither steps nor fills its moments while it waits
        for p in run.qs.mixing_head.parameters():
            p.grad = None
    grad_norm = torch.nn.utils.clip_grad_norm_(run.qs.parameters(), cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm    # FSDP: a DTensor
    if parallel.any_rank(not torch.isfinite(grad_norm), ranks):
        return {"step": step + 1, "nonfinite": {"grad_norm": float(grad_norm)}}
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    drift = parallel.marker_drift(run.qs)            # under FSDP gathers the two marker rows, not the whole root
    parts = {k: parallel.mean(v, ranks) for k, v in parts.items()}                 # the mean over ranks
    return {"step": step + 1, "phase": "think" if thinking else "plain", **{k: round(v, 6) for k, v in parts.items()},
            **split, "grad_norm": round(grad_norm.item(), 4), "lr": run.optimizer.param_groups[0]["lr"],
            "marker_drift_start": round(drift[0], 6), "marker_drift_end": round(drift[1], 6),
            "tokens_per_s": round(batch_size * ranks.world * cfg.grad_accum * cfg.seq_len / (time.time() - t0), 1)}


@torch.no_grad()
def evaluate(run: "Run") -> dict:
    """Held-out NLLs with and without thoughts and the controls (eval.evaluation_row) and the content reward on
    consecutive windows; on windows aligned on bare answers, the oracle and the thought accuracy (research/content)."""
    qs, row = run.qs, {}
    qs.eval()
    torch.manual_seed(run.cfg.seed)
    with run.autocast(), parallel.gathered(qs, run.ranks):
        windows = torch.from_numpy(run.val["text"][0]).to(run.device)
        row |= evaluation_row(qs, windows, run.filler_id)
        reward = content_reward(qs, windows, run.filler_id)
        row["eval_content_reward"] = {k: [round(x, 6) for x in v] for k, v in reward.items()}
        crash_point("eval")                         # tests/test_crash.py: a SIGKILL during evaluation
        if "answer" in run.val:
            windows, focus = (torch.from_numpy(x).to(run.device) for x in run.val["answer"])
            row |= answer_row(qs, run.tokenizer, windows, focus, run.filler_id)
    qs.train()
    return row


# ---- 6. the loop -------------------------------------------------------------------------------------------

def run_loop(run: Run, start_step: int, stop: StopRequest) -> int:
    from tqdm import tqdm
    cfg, main = run.cfg, run.ranks.main
    if start_step == 0:
        run.log({"step": 0} | evaluate(run))
        say(run, "before training:\n    " + format_eval(run.log.rows[-1]))
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, unit="step",
               dynamic_ncols=True, disable=not main)
    stop.start_training(run.ranks)
    for step in bar:
        row = train_step(run, step)
        if "nonfinite" in row:
            bar.close()
            return stop_on_nan(row, run)
        done = row["step"]
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            row |= evaluate(run)
        run.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", reward=f"{row.get('reward_mean', 0):+.3f}",
                        mix=f"{row.get('mix_weight_mean', 0):+.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        stopping = parallel.any_rank(stop.signal is not None, run.ranks)
        if done % cfg.save_interval == 0 or done == cfg.max_steps or stopping:
            error = save_checkpoint(run, done)
            if error:
                bar.close()
                return fail(error, code=1) if main else 1
        if stopping:
            bar.close()
            say(run, f"stopped at step {done}; checkpoint saved in {run.out_dir}. Continue with: "
                     f"python train.py --out_dir {run.out_dir} --resume")
            return 0 if stop.signal in (None, signal.SIGTERM) else 130
    bar.close()
    return 0


# ---- 7. main ------------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    """Settings, then train() inside torchrun's process group and the Ctrl-C / SIGTERM handler; a mistake the user
    made ends in one "error:" line (machinery/run.py: launch)."""
    return launch(argv, parse_args, train)


def train(cfg: TrainConfig, qcfg: LeverConfig, changed: list[str], ranks: parallel.Ranks, device,
          stop: StopRequest) -> int:
    run = start_run(cfg, qcfg, ranks, device)              # threads, allocator, autocast; the run folder checked
    documents = read_documents(cfg)                        # bad data fails before anything is written
    with lock_run_folder(run) as checkpoint:               # the lock; on --resume the verified checkpoint
        run.qs, run.tokenizer = build_model(cfg, qcfg, device, run.use_bf16, checkpoint)
        check(not cfg.forced_steps or (isinstance(run.qs, Levers) and cfg.data == "arithmetic"),
              "--forced_steps forces the worked step before bare answers: it needs --data arithmetic and a lever of "
              "research/levers.py (e.g. --think_at answers)")
        if qcfg.kl_to_start:
            run.qs.set_start_policy(start_policy(cfg, qcfg, device, run.use_bf16))
        run.train_data, run.think_data, run.val = load_data(cfg, documents, run.tokenizer,
                                                            (run.qs.model.config.eos_ids or [None])[0])
        run.filler_id = filler_token_id(run.tokenizer)
        run.step_module = parallel.wrap(run.qs, ranks, device, run.use_bf16)
        run.optimizer = torch.optim.AdamW(param_groups(run.qs, cfg), betas=(0.9, 0.999), eps=1e-8,
                                          fused=gpu.fused_adamw(device, ranks.mode))
        start_step = resume_optimizer(run.qs, run.optimizer, checkpoint, partial(group_settings, cfg=cfg)) \
            if checkpoint else 0
        run.log = MetricsLog(run.out_dir / "metrics.jsonl", start_step, write=ranks.main)
        stop.check()                                       # a Ctrl-C while loading whose exception was lost
        say(run, describe(run, start_step, changed))
        started = time.time()
        try:
            code = run_loop(run, start_step, stop)
            stop.training = False                          # saved: a Ctrl-C in the summary below just stops
            if code == 0 and run.log.rows[-1]["step"] == cfg.max_steps:
                finish(run, time.time() - started, cfg.max_steps - start_step)
            return code
        except KeyboardInterrupt as e:                     # before the first step, a second Ctrl-C, or the end
            return interrupted(run, e)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
