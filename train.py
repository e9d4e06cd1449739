"""Train Quiet-STaR. Reads top to bottom: config, setup, data, model, optimizer, eval, loop.

    python train.py                                    # CPU quick start: SmolLM2-135M, built-in arithmetic text
    python train.py --data=../shared/data/gsm8k/train.jsonl --max_steps=200
    python train.py --preset=paper --lora_rank=16      # one GPU: Mistral-7B, the official hyperparameters
    python train.py --out_dir=out --resume=1           # continue a run exactly where its checkpoint left it

Every field of TrainConfig and of qstar.QuietStarConfig can be set with --key=value.
"""

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from data import TokenWindows, arithmetic_texts, bare_answer_spans, read_texts
from eval import filler_token_id
from model import load_pretrained
from qstar import QuietStar, QuietStarConfig


# ---- config -------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    preset: str = "cpu"             # cpu: the quick start below; paper: Mistral-7B with the official settings
    model: str = "smollm2-135m"     # built-in short name, a local Hugging Face folder or a Hub id
    data: str = "arithmetic"        # arithmetic (built in) | a .txt or .jsonl file | a Hub dataset name
    bare_fraction: float = 0.0      # arithmetic: the fraction of problems answered bare ("A: 47.") instead of worked
    out_dir: str = "out"            # checkpoint (Hugging Face layout), metrics.jsonl, thoughts.html
    resume: bool = False            # continue the run saved in out_dir
    max_steps: int = 40             # optimizer steps
    batch_size: int = 2             # windows of text per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    seq_len: int = 64               # tokens per window
    lr: float = 2e-5                # base model (or LoRA) learning rate
    lr_mixing_head: float = 1e-3    # the mixing head starts at zero and must learn fast
    lr_markers: float = 1e-3        # on the stored markers, i.e. x marker_grad_scale in embedding space
    weight_decay: float = 0.001     # official value; none on norms, biases and markers
    warmup_steps: int = 5           # linear warm-up, then constant (as the official run)
    grad_clip: float = 1.0          # global gradient-norm clip
    eval_interval: int = 20         # steps between held-out evaluations (also at the start and the end)
    eval_windows: int = 8           # held-out windows per evaluation
    eval_answers: int = 32          # held-out bare answers per evaluation (arithmetic with bare_fraction > 0)
    save_interval: int = 20         # steps between checkpoints (also at the end and on Ctrl-C)
    plain_steps: int = 0            # the first steps train next-token prediction only (no thoughts): cheap format learning
    plain_batch_size: int = 0       # windows per micro-batch in those steps; 0 = batch_size
    lora_rank: int = 0              # 0 = full fine-tuning; > 0 = LoRA adapters on the base model
    lora_alpha: float = 32.0        # LoRA scale alpha / rank
    device: str = "auto"            # auto = cuda if available, else cpu
    seed: int = 1337                # data order, thought samples and initialisation
    threads: int = 0                # CPU threads for torch; 0 = torch's default


PRESETS = {
    # The CPU quick start: short thoughts, so that the default run fits in about 12 minutes on 2 cores.
    "cpu": dict(thought_len=4, n_true=2, n_thoughts=2),
    # The authors' run (reference doc section 1): Mistral-7B-v0.1, OpenWebMath, 256-token windows, 8 documents
    # per step, n_ahead 12 (9 thought tokens), n_ahead_talk 4, n_passes 2, lr 1e-6, 20 warm-up steps, ~100 steps.
    "paper": dict(model="mistralai/Mistral-7B-v0.1", data="open-web-math/open-web-math", max_steps=100,
                  batch_size=4, grad_accum=2, seq_len=256, lr=1e-6, lr_mixing_head=1e-6, lr_markers=1e-6,
                  weight_decay=0.001, warmup_steps=20, eval_interval=10, save_interval=100, eval_windows=32,
                  thought_len=9, n_true=4, n_thoughts=2, activation_checkpointing=True),
}


def parse_args(argv: list[str]) -> tuple[TrainConfig, QuietStarConfig]:
    """--key=value for any field of TrainConfig or QuietStarConfig, parsed by the field's type."""
    train_fields = {f.name: f for f in fields(TrainConfig)}
    qstar_fields = {f.name: f for f in fields(QuietStarConfig)}
    valid = sorted(train_fields) + sorted(qstar_fields)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: arguments look like --key=value, got {arg!r}. Valid keys: {', '.join(valid)}")
        key, value = arg[2:].split("=", 1)
        field = train_fields.get(key) or qstar_fields.get(key)
        if field is None:
            raise SystemExit(f"error: unknown key {key!r}. Valid keys: {', '.join(valid)}")
        overrides[key] = parse_value(key, value, field.type, valid)
    preset = overrides.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = PRESETS[preset] | overrides
    saved = Path(overrides.get("out_dir", TrainConfig.out_dir)) / "train_config.json"
    if overrides.get("resume") and saved.exists():   # continue with the saved settings unless told otherwise
        saved = json.loads(saved.read_text())
        values = saved["train"] | saved["qstar"] | overrides
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    qcfg = QuietStarConfig(**{k: v for k, v in values.items() if k in qstar_fields})
    return cfg, qcfg


def parse_value(key: str, text: str, annotation, valid: list[str]):
    kind = getattr(annotation, "__name__", str(annotation))         # "int", "float | None", ...
    try:
        if "bool" in kind:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if "None" in kind and text.lower() == "none":
            return None
        if "int" in kind:
            return int(text)
        if "float" in kind:
            return float(text)
        return text
    except ValueError:
        raise SystemExit(f"error: --{key}={text!r} is not a valid {kind}. Valid keys: {', '.join(valid)}") from None


# ---- checkpoints: Hugging Face layout + Quiet-STaR parts + optimizer state, written atomically ----------

def save_checkpoint(out_dir: Path, qs: QuietStar, tokenizer, optimizer, step: int, cfg: TrainConfig,
                    qcfg: QuietStarConfig):
    """Write every file into a fresh temporary folder first, then move them into out_dir one by one
    (os.replace is atomic per file), train_state.pt last: an interruption while writing (the slow part)
    leaves the previous checkpoint untouched, and train_state.pt names the step of the files beside it."""
    tmp = out_dir / f".checkpoint-{step}.tmp"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        state = None
        if cfg.lora_rank:
            from lora import base_state_dict, save_adapters
            state = base_state_dict(qs.model)
            save_adapters(qs.model, tmp, cfg.model, cfg.lora_rank, cfg.lora_alpha)
        qs.save_pretrained(tmp, tokenizer, model_state=state)
        (tmp / "train_config.json").write_text(json.dumps({"train": asdict(cfg), "qstar": asdict(qcfg)}, indent=2))
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp / "train_state.pt")
        files = sorted(tmp.iterdir(), key=lambda f: f.name == "train_state.pt")
        for f in files:
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        for f in files:
            os.replace(f, out_dir / f.name)
    finally:
        for f in tmp.glob("*"):
            f.unlink()
        if tmp.exists():
            tmp.rmdir()


def checkpoint_step(out_dir: Path) -> int | None:
    state = out_dir / "train_state.pt"
    return torch.load(state, map_location="cpu", weights_only=True)["step"] if state.exists() else None


# ---- evaluation ------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(qs: QuietStar, val: dict, filler_id: int, device, autocast, seed: int) -> dict:
    """Held-out NLL of the next token with no thought, the sampled thought and the two controls (eval.py says
    why), on consecutive windows (all tokens and the hardest 10%) and on windows aligned on the focus tokens."""
    from eval import PREDICTORS, compare_thoughts, score_thoughts
    qs.eval()
    torch.manual_seed(seed)
    row = {}
    with autocast():
        for name, (windows, focus) in val.items():
            scores = score_thoughts(qs, torch.from_numpy(windows).to(device), filler_id, batch_size=4)
            result = compare_thoughts(scores, torch.from_numpy(focus[:, 1:]) if name == "answer" else None)
            subsets = {"answer": "focus"} if name == "answer" else {"": "all", "hard": "hard"}
            for prefix, subset in subsets.items():
                if subset in result:
                    key = f"eval_{prefix}_" if prefix else "eval_"
                    row |= {f"{key}nll_{p}": round(result[subset]["nll"][p], 6) for p in PREDICTORS}
                    row[f"{key}diff"] = {k: [round(x, 6) for x in v] for k, v in result[subset]["diff"].items()}
            if name == "text":
                row["eval_mix_weight"] = round(result["mix_weight"], 6)
    qs.train()
    return row


# ---- the run ---------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    cfg, qcfg = parse_args(argv)

    # ---- setup
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def autocast():  # bf16 matmuls on GPU; the weights (fp32 masters) and the optimizer stay in fp32
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved_step = checkpoint_step(out_dir)
    if cfg.resume and saved_step is None:
        raise SystemExit(f"error: --resume=1 but {out_dir} holds no checkpoint (train_state.pt)")
    if not cfg.resume and saved_step is not None:
        raise SystemExit(f"error: {out_dir} already holds a checkpoint at step {saved_step}. Continue it with "
                         f"--resume=1, or choose another --out_dir")
    torch.manual_seed(cfg.seed)

    # ---- model
    # Full fine-tuning resumes from the weights in out_dir; LoRA from the frozen base plus saved adapters.
    base_dtype = torch.bfloat16 if cfg.lora_rank and use_bf16 else torch.float32   # frozen LoRA base in bf16
    source = out_dir if cfg.resume and not cfg.lora_rank else cfg.model
    model, tokenizer = load_pretrained(source, dtype=base_dtype, device=device)
    if cfg.lora_rank:
        from lora import add_lora, load_adapters
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        model.to(device)
        if cfg.resume:
            load_adapters(model, out_dir)
    qs = QuietStar(model, qcfg, tokenizer).to(device)
    if cfg.resume:  # the trained markers and mixing head, exactly as saved
        from safetensors.torch import load_file
        qs.load_state_dict(load_file(out_dir / "quietstar.safetensors", device=str(device)), strict=False)
    qs.train()

    # ---- data
    eos = (model.config.eos_ids or [None])[0]                   # documents are separated by EOS when there is one
    focus = None
    if cfg.data == "arithmetic":
        train_texts = arithmetic_texts(4000, seed=cfg.seed, bare_fraction=cfg.bare_fraction)
        val_texts = arithmetic_texts(400, seed=cfg.seed + 1, bare_fraction=cfg.bare_fraction)
        focus = bare_answer_spans if cfg.bare_fraction > 0 else None
    else:
        texts = read_texts(cfg.data)
        n_val = max(1, len(texts) // 20)
        train_texts, val_texts = texts[:-n_val], texts[-n_val:]
    train_data = TokenWindows(train_texts, tokenizer, cfg.seq_len, eos, cfg.seed)
    val_stream = TokenWindows(val_texts, tokenizer, cfg.seq_len, eos, cfg.seed, focus=focus)
    val = {"text": val_stream.windows(cfg.eval_windows)}
    if focus is not None:
        val["answer"] = val_stream.focus_windows(cfg.eval_answers)
    filler_id = filler_token_id(tokenizer)

    # ---- optimizer: three groups, because the markers and the mixing head start from scratch
    markers, mixing = list(qs.markers.parameters()), list(qs.mixing_head.parameters())
    base = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in base if p.dim() >= 2], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": [p for p in base if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": [p for p in mixing if p.dim() >= 2], "lr": cfg.lr_mixing_head, "weight_decay": cfg.weight_decay},
        {"params": [p for p in mixing if p.dim() < 2], "lr": cfg.lr_mixing_head, "weight_decay": 0.0},
        {"params": markers, "lr": cfg.lr_markers, "weight_decay": 0.0},
    ]
    groups = [g | {"base_lr": g["lr"]} for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
    start_step = 0
    if cfg.resume:
        state = torch.load(out_dir / "train_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
    trainable = sum(p.numel() for g in groups for p in g["params"])

    # ---- logging: metrics.jsonl keeps only rows up to the checkpoint we continue from
    metrics_file = out_dir / "metrics.jsonl"
    rows = [json.loads(l) for l in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    rows = [r for r in rows if r["step"] <= start_step] if cfg.resume else []
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def log(row: dict):
        rows.append(row)
        with open(metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    print(f"model {cfg.model}: {model.n_params / 1e6:.1f}M parameters, training {trainable / 1e6:.2f}M "
          f"on {device}{' (bf16 autocast)' if use_bf16 else ''}; data {cfg.data}: {len(train_data.tokens):,} "
          f"tokens; thoughts: {qcfg.n_thoughts} x {qcfg.thought_len} tokens, scored on {qcfg.n_true} true tokens")
    if start_step == 0:
        log({"step": 0} | evaluate(qs, val, filler_id, device, autocast, cfg.seed))
        print("before training:\n    " + format_eval(rows[-1]))

    # ---- Ctrl-C: finish the step, save, exit. A second Ctrl-C stops at once.
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit without saving)")
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    # ---- loop
    from tqdm import tqdm
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, unit="step",
               dynamic_ncols=True)
    started, step = time.time(), start_step
    try:
        for step in bar:
            t0 = time.time()
            thinking = step >= cfg.plain_steps          # the first plain_steps: next-token training only
            batch_size = cfg.batch_size if thinking else cfg.plain_batch_size or cfg.batch_size
            phase_step = step - (cfg.plain_steps if thinking else 0)
            lr_scale = min(1.0, (phase_step + 1) / max(1, cfg.warmup_steps))   # each phase warms up
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
            parts, split = {}, {}
            for micro in range(cfg.grad_accum):
                torch.manual_seed(cfg.seed * 1_000_003 + step * cfg.grad_accum + micro)  # resumable sampling
                tokens = torch.from_numpy(train_data.batch(step * cfg.grad_accum + micro, batch_size)).to(device)
                with autocast():
                    out = qs(tokens, think=thinking)
                if not torch.isfinite(out["loss"]):
                    return stop_on_nan(step + 1, out, out_dir, checkpoint_step(out_dir))
                if thinking and micro == 0 and (step + 1) % cfg.eval_interval == 0:
                    split = gradient_split(qs, out)
                (out["loss"] / cfg.grad_accum).backward()
                for k, v in out.items():
                    if k != "policy_term":
                        parts[k] = parts.get(k, 0.0) + v.item() / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(qs.parameters(), cfg.grad_clip)
            if not torch.isfinite(grad_norm):
                return stop_on_nan(step + 1, {"grad_norm": grad_norm}, out_dir, checkpoint_step(out_dir))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            drift = qs.markers.drift()
            row = {"step": done, "phase": "think" if thinking else "plain", **{k: round(v, 6) for k, v in parts.items()},
                   **split, "grad_norm": round(grad_norm.item(), 4), "lr": optimizer.param_groups[0]["lr"],
                   "marker_drift_start": round(drift[0], 6), "marker_drift_end": round(drift[1], 6),
                   "tokens_per_s": round(batch_size * cfg.grad_accum * cfg.seq_len / (time.time() - t0), 1)}
            if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                row |= evaluate(qs, val, filler_id, device, autocast, cfg.seed)
            log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", reward=f"{row.get('reward_mean', 0):+.3f}",
                            mix=f"{row.get('mix_weight_mean', 0):+.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if done % cfg.save_interval == 0 or done == cfg.max_steps or stop["requested"]:
                save_checkpoint(out_dir, qs, tokenizer, optimizer, done, cfg, qcfg)
            if stop["requested"]:
                bar.close()
                print(f"stopped at step {done}; checkpoint saved in {out_dir}. Continue with: python train.py "
                      f"{' '.join(a for a in argv if not a.startswith('--resume'))} --resume=1")
                return 130
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    bar.close()

    # ---- the end: thoughts page and a summary
    from eval import thought_records
    from thoughts_page import write_thoughts_page
    torch.manual_seed(cfg.seed)
    records = thought_records(qs, tokenizer, torch.from_numpy(val['text'][0][0]).to(device), filler_id)
    page = write_thoughts_page(out_dir / "thoughts.html", records, rows, title=f"Quiet-STaR thoughts: {cfg.model}")
    print_summary(rows, time.time() - started, step + 1 - start_step, out_dir, page)
    return 0


def gradient_split(qs: QuietStar, out: dict) -> dict:
    """Norms of the base model's gradient from the NLL terms and from the REINFORCE term, separately: how strongly
    the way thoughts are produced is trained, against next-token prediction. Two extra backward passes."""
    trunk = [p for p in qs.model.parameters() if p.requires_grad]
    norms = {}
    for name, part in (("grad_norm_nll", out["loss"] - out["policy_term"]), ("grad_norm_reinforce", out["policy_term"])):
        grads = torch.autograd.grad(part, trunk, retain_graph=True, allow_unused=True)
        norms[name] = round(torch.norm(torch.stack([g.norm() for g in grads if g is not None])).item(), 6)
    return norms


def stop_on_nan(step: int, parts: dict, out_dir: Path, last_good: int | None) -> int:
    values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
    where = f"the last good checkpoint (step {last_good}) is in {out_dir}" if last_good else "no checkpoint was written"
    print(f"\nerror: non-finite value at step {step} ({values}). Stopping without saving; {where}. Lower --lr "
          f"or --lr_mixing_head, or raise --grad_clip's strictness, and resume with --resume=1.", file=sys.stderr)
    return 1


def format_eval(row: dict) -> str:
    """One line per token set: NLL none / sampled / filler / shuffled, then sampled minus each, with 95% CIs."""
    lines = []
    for prefix, label in (("eval_", "all tokens"), ("eval_hard_", "hardest 10%"), ("eval_answer_", "bare answers")):
        if f"{prefix}nll_none" not in row:
            continue
        nlls = " / ".join(f"{row[f'{prefix}nll_{p}']:.4f}" for p in ("none", "sampled", "filler", "shuffled"))
        diffs = ", ".join(f"{k.split('-')[1]} {m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for k, (m, lo, hi) in row[f"{prefix}diff"].items())
        lines.append(f"{label:>12}: NLL none / sampled / filler / shuffled {nlls}; sampled minus: {diffs}")
    return "\n    ".join(lines)


def print_summary(rows, seconds, steps, out_dir, page):
    evals = [r for r in rows if "eval_nll_none" in r]
    last = rows[-1]
    plain = sum(r.get("phase") == "plain" for r in rows)
    print(f"\n{steps} steps ({plain} plain, {steps - plain} thinking) in {seconds / 60:.1f} min")
    print(f"  first eval:\n    {format_eval(evals[0])}")
    print(f"  last eval:\n    {format_eval(evals[-1])}")
    if "reward_mean" in last:
        print(f"  last step:  loss {last['loss']:.4f}, reward {last['reward_mean']:+.4f}, "
              f"mixing weight {last['mix_weight_mean']:+.4f}")
    print(f"  checkpoint: {out_dir}  (load_pretrained('{out_dir}') or QuietStar.from_pretrained)")
    print(f"  thoughts:   {page}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
