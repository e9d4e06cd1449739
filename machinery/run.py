"""The life of a training run around train.py's loop: its settings from the command line, presets and a resumed
run's saved ones; Ctrl-C and SIGTERM; saving a checkpoint and resuming the optimizer (what a checkpoint holds and
how each file is written and read: machinery/checkpoint.py); the metrics log; the summary at the end; the CPU
allocator and autocast. train.py calls each behind one name."""

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from eval import PREDICTORS
from machinery import gpu, parallel
from machinery.checkpoint import (
    CheckpointWriteError,
    RunLock,
    checkpoint_bytes,
    checkpoint_step,
    prepare_out_dir,
    read_train_config,
    read_train_state,
    verify_checkpoint,
    write_checkpoint,
    write_train_config,
    write_train_state,
)
from machinery.cli import Parser, UsageError, add_dataclass_options, fail
from machinery.hf_io import save_quietstar
from machinery.thoughts_page import thought_records, write_thoughts_page
from research.levers import LeverConfig, renamed_settings

# ---- settings ---------------------------------------------------------------------------------------------------

def build_parser(train_config, description: str) -> argparse.ArgumentParser:
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_options(parser, train_config, "training (train.py TrainConfig)")
    add_dataclass_options(parser, LeverConfig, "Quiet-STaR (qstar.py QuietStarConfig; beyond the paper: "
                                               "research/levers.py LeverConfig)")
    return parser


def parse_args(argv: list[str], train_config, presets: dict, fixed_on_resume: tuple, description: str,
               free_in_plain_phase: tuple = ()):
    """Defaults < preset < (on --resume: the run's saved settings) < what the user typed.
    -> (train_config, QuietStarConfig, the settings that a resume changes: printed, and they take effect).
    A resume cannot change fixed_on_resume, except free_in_plain_phase while the checkpoint is still in the plain
    phase (no thinking step has trained the markers or the mixing head yet)."""
    renamed_settings({a.split("=")[0][2:]: None for a in argv if a.startswith("--")})   # an old option: its new name
    given = vars(build_parser(train_config, description).parse_args(argv))
    train_keys, qstar_keys = {f.name for f in fields(train_config)}, {f.name for f in fields(LeverConfig)}
    preset = given.get("preset", train_config.preset)
    if preset not in presets:
        raise UsageError(f"--preset must be one of {sorted(presets)}, got {preset!r}")
    values, changed = presets[preset] | given, []
    if given.get("resume"):
        out_dir = Path(given.get("out_dir", train_config.out_dir))
        saved = read_train_config(out_dir)
        saved = saved["train"] | renamed_settings(saved["qstar"], old_run=True)
        differ = {k: (saved.get(k, "(not saved: a newer setting)"), v) for k, v in given.items()
                  if k != "resume" and (k not in saved or saved[k] != v)}
        still_plain = checkpoint_step(out_dir) <= saved.get("plain_steps", 0)
        fixed = [f"--{k} {old!r} -> {new!r}" for k, (old, new) in differ.items()
                 if k in saved and k in fixed_on_resume and not (still_plain and k in free_in_plain_phase)]
        if fixed:
            raise UsageError(f"--resume cannot change {', '.join(fixed)}: they define the model or the thought "
                             "shape; start a new --out_dir instead")
        changed = [f"--{k} {old} -> {new}" for k, (old, new) in differ.items()]
        values = saved | given
    try:
        return (train_config(**{k: v for k, v in values.items() if k in train_keys}),
                LeverConfig(**{k: v for k, v in values.items() if k in qstar_keys}), changed)
    except ValueError as e:
        raise UsageError(str(e)) from None



# ---- the run, and stopping it ---------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything train.py's loop needs, built by its train() stage by stage."""
    cfg: object                               # train.TrainConfig
    qcfg: LeverConfig
    ranks: parallel.Ranks
    device: torch.device
    autocast: object                          # a context manager: bf16 autocast on GPU, nothing on the CPU
    out_dir: Path
    use_bf16: bool = False
    qs: torch.nn.Module = None                # the QuietStar
    step_module: torch.nn.Module = None       # qs, or DDP(qs): what a training step calls
    tokenizer: object = None
    optimizer: torch.optim.Optimizer = None
    train_data: object = None                 # data.TokenWindows: the plain steps'
    think_data: object = None                 # ... and the thinking steps' (data.ProblemWindows, or train_data)
    val: dict = None
    filler_id: int = 0
    log: "MetricsLog" = None


def launch(argv: list[str], parse, train) -> int:
    """train.py's main: parse(argv) -> (cfg, qcfg, changed); torchrun's process group (machinery/parallel.py);
    train(cfg, qcfg, changed, ranks, device, stop) under the Ctrl-C / SIGTERM handler. A mistake the user can
    make ends in one "error:" line and exit code 2; a signal before training in 128 + its number."""
    try:
        cfg, qcfg, changed = parse(argv)
        ranks, device = parallel.setup(cfg.parallel, cfg.device, cfg.dist_timeout)
        try:
            with StopRequest() as stop:
                return train(cfg, qcfg, changed, ranks, device, stop)
        finally:
            parallel.teardown()
    except (UsageError, ValueError, OSError) as e:
        return fail(e)
    except KeyboardInterrupt as e:
        print("\ninterrupted; no checkpoint was written by this run", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)


def start_run(cfg, qcfg, ranks: parallel.Ranks, device) -> Run:
    """Threads, TF32 on GPU, the CPU allocator's setting, bf16 autocast where the GPU has it; the run folder
    checked (not a file, not the model, no checkpoint unless --resume, one unless not)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gpu.matmul_tf32(device)
    if device.type == "cpu":
        fix_glibc_mmap_threshold()
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    run = Run(cfg, qcfg, ranks, device, autocast_for(device, use_bf16), Path(cfg.out_dir), use_bf16)
    prepare_out_dir(run.out_dir, cfg.model, cfg.resume)
    return run


@contextlib.contextmanager
def lock_run_folder(run: Run):
    """Hold the run folder's lock (rank 0) for the life of the run -> the verified checkpoint to resume, or None."""
    with RunLock(run.out_dir) if run.ranks.main else contextlib.nullcontext():
        parallel.barrier(run.ranks)                              # rank 0 holds the lock before anyone writes
        yield verify_checkpoint(run.out_dir) if run.cfg.resume else None


def describe(run: Run, start_step: int, changed: list[str]) -> str:
    cfg, qcfg, ranks = run.cfg, run.qcfg, run.ranks
    return (f"model {cfg.model}: {run.qs.model.n_params / 1e6:.1f}M parameters on {run.device}"
            f"{' (bf16 autocast)' if run.use_bf16 else ''}"
            f"{f', {ranks.world} ranks ({cfg.parallel})' if ranks.world > 1 else ''}; "
            f"data {cfg.data}: {len(run.train_data.tokens):,} tokens; thoughts: {qcfg.n_thoughts} x "
            f"{qcfg.thought_len} tokens, scored on {qcfg.n_true} true tokens"
            + (f"\nresuming at step {start_step} with changed settings: {', '.join(changed)}" if changed else ""))


def interrupted(run: Run, e: KeyboardInterrupt) -> int:
    """A Ctrl-C or SIGTERM that stops the run without saving: say where the last checkpoint is. -> exit code"""
    last = checkpoint_step(run.out_dir)
    say(run, "\ninterrupted without saving" + (f"; the last checkpoint is step {last} in {run.out_dir}"
                                               if last is not None else "; no checkpoint was written"))
    return 128 + getattr(e, "signum", signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM that stops the run at once; the exit code is 128 + its number (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Ctrl-C or SIGTERM (what schedulers and `docker stop` send). While nothing is left to save (loading, the
    first evaluation, the end) the run stops at once. While it trains: finish the step, save, exit; a second
    Ctrl-C quits at once, unsaved.

    Installed before anything loads: under Python's default handler a Ctrl-C that came while torch made its lazy
    imports was lost in 6 runs of 10 (the run trained on). This handler records the signal before it raises, and
    `check()` stops a run whose exception went missing before its first step."""

    def __init__(self):
        self.signal, self.training = None, False

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.previous:
            signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        again = self.signal is not None
        self.signal = self.signal or signum                     # the first one decides the exit code
        if not self.training or (again and signum == signal.SIGINT):
            raise Interrupted(signum)
        if not again:
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"\n{name}: saving a checkpoint after this step (Ctrl-C again to quit without saving)", flush=True)

    def check(self, ranks: parallel.Ranks | None = None):
        stop = self.signal is not None
        if not self.training and (parallel.any_rank(stop, ranks) if ranks else stop):
            raise Interrupted(self.signal or signal.SIGINT)

    def start_training(self, ranks: parallel.Ranks):
        self.check(ranks)                                        # every rank stops, or none
        self.training = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False



# ---- checkpoints, metrics and the end ----------------------------------------------------------------------

def resume_optimizer(qs, optimizer, checkpoint: Path, group_settings) -> int:
    """Load the optimizer's state (full, keyed by parameter name: written by any number of ranks), then set every
    group's learning rate and weight decay from the settings, so that --lr and friends given on --resume take
    effect. -> the step to continue from."""
    step, optim = read_train_state(checkpoint)
    parallel.load_optimizer(qs, optimizer, optim)
    for group in optimizer.param_groups:
        group.update(group_settings(group["name"]))
    return step


def save_checkpoint(run: "Run", step: int) -> str | None:
    """Gather the full state on every rank, then rank 0 writes the checkpoint's files (the table in
    machinery/checkpoint.py, in its order) through checkpoint.write_checkpoint.
    -> None, or on every rank the error if the write failed (disk full, read-only folder): `latest` still names
    the previous checkpoint, and the run ends with that one line."""
    qs, cfg = run.qs, run.cfg
    state, optimizer_state = parallel.full_states(qs, run.optimizer)
    error = None
    if run.ranks.main:
        def write_files(folder: Path):
            if cfg.lora_rank:
                save_adapters(qs.model, folder, cfg.model, cfg.lora_rank, cfg.lora_alpha)
            save_quietstar(qs, folder, run.tokenizer, model_state)
            write_train_config(folder, cfg, run.qcfg)
            write_train_state(folder, step, optimizer_state)
        try:
            model_state, adapters = state, {}
            if cfg.lora_rank:                       # the merged base weights, plus the adapters in peft's layout
                from machinery.lora import base_state_dict, save_adapters
                model_state = {f"model.{k}": v for k, v in base_state_dict(qs.model).items()} | \
                    {k: v for k, v in state.items() if not k.startswith("model.")}
                adapters = {k: v for k, v in state.items() if ".lora_" in k}
            needed = checkpoint_bytes(model_state, adapters, optimizer_state,
                                      text_bytes=len(run.tokenizer.to_str(pretty=True).encode()))
            write_checkpoint(run.out_dir, step, write_files, needed)
        except Exception as e:                      # every rank must hear of it, or the others would wait
            error = e
    if parallel.any_rank(error is not None, run.ranks):
        if error is not None and not isinstance(error, CheckpointWriteError):
            # a bug, not the storage: its traceback, under an error that launch does not take for a user's mistake
            # (it prints a ValueError or an OSError in one line)
            raise RuntimeError(f"writing the checkpoint of step {step} failed: a bug, not the storage") from error
        last = checkpoint_step(run.out_dir)
        kept = f"the latest checkpoint is still step {last}" if last is not None else "no checkpoint was written"
        return (f"{error or 'rank 0 could not write the checkpoint'}. Not saved; {kept}. Free space or fix the "
                f"folder, then continue with: python train.py --out_dir {run.out_dir} --resume")
    return None


def gradient_split(qs, out: dict) -> dict:
    """Norms of the base model's gradient from the NLL terms and from the REINFORCE term, separately: how strongly
    the way thoughts are produced is trained, against next-token prediction. Two extra backward passes."""
    trunk = [p for p in qs.model.parameters() if p.requires_grad]
    norms = {}
    for name, part in (("grad_norm_nll", out["loss"] - out["policy_term"]), ("grad_norm_reinforce", out["policy_term"])):
        grads = torch.autograd.grad(part, trunk, retain_graph=True, allow_unused=True)
        norms[name] = round(torch.norm(torch.stack([g.norm() for g in grads if g is not None])).item(), 6)
    return norms


def say(run: Run, text: str):
    if run.ranks.main:
        print(text, flush=True)


def stop_on_nan(row: dict, run: Run) -> int:
    values = ", ".join(f"{k}={v:.4g}" for k, v in row["nonfinite"].items())
    last_good, out_dir = checkpoint_step(run.out_dir), run.out_dir
    where = (f"the last good checkpoint (step {last_good}) is in {out_dir}; continue it with lower learning rates: "
             f"python train.py --out_dir {out_dir} --resume --lr <smaller> --lr_mixing_head <smaller>"
             if last_good else "no checkpoint was written; start again with a lower --lr or --lr_mixing_head")
    return fail(f"non-finite value at step {row['step']} ({values}). Stopped without saving; {where}", code=1)


class MetricsLog:
    """metrics.jsonl: one JSON line per step, written by rank 0. On resume, only the rows up to the checkpoint's
    step are kept."""

    def __init__(self, path: Path, start_step: int, write: bool = True):
        self.path, self.write = path, write
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() and start_step else []
        self.rows = [r for r in rows if r["step"] <= start_step]
        if write:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def __call__(self, row: dict):
        self.rows.append(row)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def finish(run: Run, seconds: float, steps: int):
    cfg, rows = run.cfg, run.log.rows
    torch.manual_seed(cfg.seed)
    with parallel.gathered(run.qs, run.ranks):
        records = thought_records(run.qs, run.tokenizer, torch.from_numpy(run.val["text"][0][0]).to(run.device),
                                  run.filler_id)
    if not run.ranks.main:
        return
    page = write_thoughts_page(run.out_dir / "thoughts.html", records, rows, title=f"Quiet-STaR thoughts: {cfg.model}")
    evals = [r for r in rows if "eval_nll_none" in r]
    plain = sum(r.get("phase") == "plain" for r in rows[-steps:]) if steps else 0
    print(f"\n{steps} steps ({plain} plain, {steps - plain} thinking) in {seconds / 60:.1f} min"
          f"{f' on {run.ranks.world} ranks ({cfg.parallel})' if run.ranks.world > 1 else ''}")
    print(f"  first eval:\n    {format_eval(evals[0])}")
    print(f"  last eval:\n    {format_eval(evals[-1])}")
    if "reward_mean" in rows[-1]:
        print(f"  last step:  loss {rows[-1]['loss']:.4f}, reward {rows[-1]['reward_mean']:+.4f}, "
              f"mixing weight {rows[-1]['mix_weight_mean']:+.4f}")
    print(f"  checkpoint: {run.out_dir}  (machinery.hf_io: load_quietstar('{run.out_dir}') or load_pretrained)")
    print(f"  thoughts:   {page}")


def format_eval(row: dict) -> str:
    """One line per token set: the predictors' NLLs (eval.py: PREDICTORS), then the contrasts with 95% CIs; the
    content reward and how often a thought before a bare answer writes it."""
    lines = []
    for prefix, label in (("eval_", "all tokens"), ("eval_hard_", "hardest 10%"), ("eval_post_", "post alone"),
                          ("eval_answer_", "bare answers"), ("eval_answer_post_", "answers, post")):
        if f"{prefix}nll_none" in row:
            shown = [p for p in PREDICTORS if f"{prefix}nll_{p}" in row]
            nlls = " / ".join(f"{row[f'{prefix}nll_{p}']:.4f}" for p in shown)
            diffs = {k: f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for k, (m, lo, hi) in row[f"{prefix}diff"].items()}
            sampled = ", ".join(f"{k.split('-')[1]} {v}" for k, v in diffs.items() if k.startswith("sampled-"))
            oracle = f"; oracle minus none: {diffs['oracle-none']}" if "oracle-none" in diffs else ""
            lines.append(f"{label:>12}: NLL {' / '.join(shown)} {nlls}; sampled minus: {sampled}{oracle}")
    if "eval_content_reward" in row:
        lines.append("content reward (sampled - shuffled thought, or _filler): " + ", ".join(
            f"{k} {m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for k, (m, lo, hi) in row["eval_content_reward"].items()))
    if "eval_thought_accuracy" in row:
        sampled, shuffled, n = row["eval_thought_accuracy"]
        lines.append(f"thoughts before a bare answer that write it: {sampled:.3f} (another problem's: {shuffled:.3f}; "
                     f"n = {n})")
    return "\n    ".join(lines)


# ---- the machine ------------------------------------------------------------------------------------------

def fix_glibc_mmap_threshold():
    """On the CPU, glibc's malloc raises its mmap threshold (up to 32 MiB) each time a large block is freed; after
    that a step's many large, short-lived tensors come from the heap and fragment it. A fixed 1 MiB threshold (what
    MALLOC_MMAP_THRESHOLD_=1048576 sets) keeps them in mmap, returned to the system when freed: 4.4 against 7.3 GiB
    peak RSS at the same speed (results/allocator.json). Harmless under jemalloc or tcmalloc (LD_PRELOAD); skipped
    off glibc and when the user set the variable."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_MMAP_THRESHOLD = -3                                        # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def autocast_for(device, use_bf16: bool):
    """bf16 matmuls on GPU (fp32 master weights and optimizer); the same wrapper, disabled, on the CPU."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
