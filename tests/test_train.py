"""train.py end to end on a tiny model: metrics, checkpoints, exact resume, atomic writes, presets, NaN,
Ctrl-C and LoRA. Bad input and the run folder's guarantees are in test_bad_input.py."""

import errno
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch
from conftest import ROOT, tiny_model

import train
from machinery import run as machinery_run
from machinery.checkpoint import checkpoint_step
from machinery.hf_io import load_pretrained, load_quietstar, save_pretrained
from qstar import QuietStarConfig

STEP_KEYS = {"step", "loss", "nll_base", "nll_mixed", "nll_talk", "reinforce", "reward_mean", "mix_weight_mean",
             "grad_norm", "lr", "tokens_per_s"}
EVAL_KEYS = {f"eval_{s}nll_{p}" for s in ("", "hard_") for p in ("none", "sampled", "filler", "shuffled")} | {"eval_diff", "eval_hard_diff"}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random 2-layer model with the real SmolLM2 tokenizer, so that the built-in text tokenizes."""
    _, tokenizer = load_pretrained("smollm2-135m")
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), window=None, std=0.05)
    model.config.eos_token_id = 2
    path = tmp_path_factory.mktemp("tiny-smol")
    save_pretrained(model, tokenizer, path)
    return path


def args(tiny_dir, out_dir, **extra):
    base = dict(model=tiny_dir, out_dir=out_dir, seq_len=20, batch_size=2, max_steps=4, eval_interval=2,
                save_interval=2, eval_windows=2, thought_len=2, n_true=2, lr=1e-3)
    return [f"--{k}={v}" for k, v in (base | extra).items()]


def latest(out_dir):
    return out_dir / (out_dir / "latest").read_text().strip()


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_run_writes_metrics_checkpoint_and_thoughts(tiny_dir, tmp_path, capsys):
    assert train.main(args(tiny_dir, tmp_path)) == 0
    rows = read_metrics(tmp_path)
    assert rows[0]["step"] == 0 and EVAL_KEYS <= rows[0].keys()            # evaluation before training
    assert [r["step"] for r in rows[1:]] == [1, 2, 3, 4]
    assert all(STEP_KEYS <= r.keys() for r in rows[1:])
    assert EVAL_KEYS <= rows[2].keys() and EVAL_KEYS <= rows[4].keys()
    summary = capsys.readouterr().out
    assert "4 steps (0 plain, 4 thinking) in" in summary and "last eval:" in summary
    # the checkpoint: Hugging Face layout for our loader (and transformers), plus the Quiet-STaR parts
    model, _ = load_pretrained(tmp_path)
    qs, _ = load_quietstar(tmp_path)
    start, _ = qs.marker_embeddings()
    untrained, _ = load_pretrained(tiny_dir)
    # the markers trained (moved by 0.13, against allclose's 1e-8 + 1e-5 x 0.1)...
    assert not torch.allclose(start, untrained.embed_tokens.weight[1265].float())
    from safetensors.torch import load_file
    saved = load_file(latest(tmp_path) / "quietstar.safetensors")
    assert torch.equal(qs.markers.stored, saved["markers.stored"])                   # ...and load as saved
    assert qs.mixing_head.net[-1].weight.abs().max() > 0
    assert qs.config.thought_len == 2 and qs.config.marker_init == "\u2014"
    assert torch.equal(model.embed_tokens.weight, qs.model.embed_tokens.weight)
    page = (tmp_path / "thoughts.html").read_text()
    assert page.count('class="tok"') == 20 and "http" not in page.split("</head>")[0]


def test_transformers_loads_the_checkpoint(tiny_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert train.main(args(tiny_dir, tmp_path, max_steps=1)) == 0
    ours, _ = load_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(latest(tmp_path)).eval()
    tokens = torch.randint(0, 1000, (1, 7))
    # the same weights and ops (measured equal bit for bit): 1e-5 allows another kernel's order (~1e-8 at logits
    # ~0.06), and a weight read into the wrong place moves logits by their own size
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("plain_steps", [0, 2], ids=["thinking", "from-the-plain-phase"])
def test_resume_gives_exactly_the_uninterrupted_losses(tiny_dir, tmp_path, plain_steps):
    """Also from a checkpoint in the plain phase, where the markers and the mixing head have no optimizer state yet."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train.main(args(tiny_dir, whole, plain_steps=plain_steps)) == 0
    assert train.main(args(tiny_dir, part, max_steps=2, plain_steps=plain_steps)) == 0
    assert train.main([f"--out_dir={part}", "--max_steps=4", "--resume"]) == 0   # settings come from out_dir

    def without_timing(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert without_timing(read_metrics(part)) == without_timing(read_metrics(whole))


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_readable(tiny_dir, tmp_path, monkeypatch, capsys):
    assert train.main(args(tiny_dir, tmp_path, max_steps=2)) == 0
    before = {f.relative_to(tmp_path): f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}

    def crash(*a, **k):
        raise OSError(errno.ENOSPC, "disk full (simulated)")
    monkeypatch.setattr(machinery_run.torch, "save", crash)                       # dies after the weights are written
    assert train.main([f"--out_dir={tmp_path}", "--max_steps=4", "--resume"]) == 1      # a failed write: exit 1
    err = capsys.readouterr().err.strip().splitlines()[-1]                      # the one line, after the bars
    assert "latest checkpoint is still step 2" in err and err.endswith(f"--out_dir {tmp_path} --resume"), err
    after = {f.relative_to(tmp_path): f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    checkpoint_files = {k: v for k, v in before.items() if k.parts[0].startswith("checkpoint-") or k.name == "latest"}
    assert {k: after.get(k) for k in checkpoint_files} == checkpoint_files
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / ".lock").exists()   # nothing half-written left
    assert checkpoint_step(tmp_path) == 2
    load_pretrained(tmp_path)


def test_presets_and_overrides():
    cfg, qcfg, _ = train.parse_args(["--preset=paper", "--lora_rank", "16"])
    assert (cfg.model, cfg.lr, cfg.seq_len, cfg.lora_rank) == ("mistralai/Mistral-7B-v0.1", 1e-6, 256, 16)
    assert (qcfg.thought_len, qcfg.n_true, qcfg.n_thoughts) == (9, 4, 2)
    cfg, qcfg, _ = train.parse_args(["--thought_len=6", "--reinforce_temperature=3", "--no-fast"])
    assert (cfg.preset, qcfg.thought_len, qcfg.reinforce_temperature, cfg.fast) == ("cpu", 6, 3.0, False)
    cfg, qcfg, _ = train.parse_args(["--preset", "think"])
    assert (cfg.plain_steps, cfg.max_steps, qcfg.thought_len, cfg.bare_fraction, cfg.problems) == (200, 260, 12, 0.5, "all")


def test_help_lists_every_option_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(train.TrainConfig) + fields(QuietStarConfig):
        assert f"--{f.name}" in text, f.name
    assert "--max_steps INT optimizer steps in all (plain and thinking) (default: 40)" in text
    assert "--resume [BOOL], --no-resume [BOOL] continue the run saved in out_dir (default: False)" in text
    assert "non-myopic (n_ahead_talk: 4) (default: 4)" in text


@pytest.mark.parametrize("spelling,value", [("--resume", True), ("--no-resume", False), ("--resume=true", True),
                                            ("--resume=1", True), ("--resume=YES", True), ("--resume=on", True),
                                            ("--resume=false", False), ("--resume=0", False), ("--resume=no", False)])
def test_boolean_flags_take_every_common_spelling(spelling, value):
    assert vars(train.build_parser().parse_args([spelling]))["resume"] is value


def test_changed_learning_rates_take_effect_on_resume(tiny_dir, tmp_path, capsys):
    assert train.main(args(tiny_dir, tmp_path, max_steps=1)) == 0
    assert train.main([f"--out_dir={tmp_path}", "--max_steps=2", "--resume", "--lr=0.25", "--weight_decay=0.5",
                       "--lr_markers=0.125", "--warmup_steps=0"]) == 0
    printed = capsys.readouterr().out
    assert "resuming at step 1 with changed settings:" in printed
    assert "--max_steps 1 -> 2" in printed and "--lr 0.001 -> 0.25" in printed and "--weight_decay 0.001 -> 0.5" in printed
    state = torch.load(latest(tmp_path) / "train_state.pt", weights_only=True)["optimizer"]["param_groups"]
    by_name = {g["name"]: g for g in state}
    assert by_name["base"]["lr"] == 0.25 and by_name["base"]["weight_decay"] == 0.5
    assert by_name["markers"]["lr"] == 0.125 and by_name["base_vectors"]["weight_decay"] == 0.0
    assert read_metrics(tmp_path)[-1]["lr"] == 0.25


def test_a_setting_newer_than_the_saved_run_is_listed_and_takes_effect_on_resume(tiny_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """A run saved before a setting existed has no value for it: typed on resume, it is listed among the changed
    settings (not silently applied) and used."""
    assert train.main(args(tiny_dir, tmp_path, max_steps=1)) == 0
    read = machinery_run.read_train_config

    def older(out_dir):                                  # the saved run as an older version wrote it
        saved = read(out_dir)
        del saved["train"]["weight_decay"]
        return saved
    monkeypatch.setattr(machinery_run, "read_train_config", older)
    assert train.main([f"--out_dir={tmp_path}", "--max_steps=2", "--resume", "--weight_decay=0.5"]) == 0
    assert "--weight_decay (not saved: a newer setting) -> 0.5" in capsys.readouterr().out
    assert json.loads((latest(tmp_path) / "train_config.json").read_text())["train"]["weight_decay"] == 0.5


def test_a_plain_phase_checkpoint_can_start_another_thinking_recipe(tiny_dir, tmp_path, capsys):
    """No thinking step has trained the markers or the mixing head yet, so the thought's shape and the head's
    squashing may change on resume (several recipes share one plain phase); after a thinking step they may not."""
    assert train.main(args(tiny_dir, tmp_path, max_steps=2, plain_steps=2)) == 0
    assert train.main([f"--out_dir={tmp_path}", "--max_steps=3", "--resume", "--n_thoughts=3", "--thought_len=3",
                       "--n_true=1", "--bounded_mixing"]) == 0
    assert "--n_thoughts 2 -> 3" in capsys.readouterr().out
    saved = json.loads((latest(tmp_path) / "train_config.json").read_text())["qstar"]
    assert (saved["n_thoughts"], saved["thought_len"], saved["n_true"], saved["bounded_mixing"]) == (3, 3, 1, True)
    step = read_metrics(tmp_path)[-1]
    # bounded: the weight starts at sigmoid(-4.595) = 0.0100007, logged to 6 decimals
    assert step["phase"] == "think" and abs(step["mix_weight_mean"] - 1 / (1 + math.exp(4.595))) <= 5e-7
    assert train.main([f"--out_dir={tmp_path}", "--max_steps=4", "--resume", "--n_thoughts=2"]) == 2
    assert "--resume cannot change --n_thoughts 3 -> 2" in capsys.readouterr().err


def test_the_mixing_head_waits_mixing_delay_thinking_steps(tiny_dir, tmp_path):
    """Its last layer starts at exactly zero (mixing weight 0): after 2 thinking steps it is still zero with a delay
    of 2, and has moved without one."""
    from safetensors.torch import load_file
    for delay, moves in ((2, False), (0, True)):
        assert train.main(args(tiny_dir, tmp_path / str(delay), max_steps=2, mixing_delay=delay)) == 0
        head = load_file(latest(tmp_path / str(delay)) / "quietstar.safetensors")["mixing_head.net.4.weight"]
        assert bool(head.any()) == moves, delay


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_dir, tmp_path, capsys):
    code = train.main(args(tiny_dir, tmp_path, lr=1e30, max_steps=5, save_interval=1))
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite value at step" in err and "last good checkpoint (step 1)" in err and "--resume --lr" in err
    assert checkpoint_step(tmp_path) == 1
    load_pretrained(tmp_path)


def test_ctrl_c_saves_and_exits(tiny_dir, tmp_path):
    argv = args(tiny_dir, tmp_path, max_steps=10_000, save_interval=10_000, eval_interval=10_000)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and (not (tmp_path / "metrics.jsonl").exists()
                                      or len(read_metrics(tmp_path)) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "checkpoint saved" in output and "Traceback" not in output
    step = checkpoint_step(tmp_path)
    assert step is not None and step >= 2 and read_metrics(tmp_path)[-1]["step"] == step


def test_lora_run_saves_peft_adapters_and_merged_weights(tiny_dir, tmp_path):
    assert train.main(args(tiny_dir, tmp_path, lora_rank=4, lora_alpha=8, max_steps=2)) == 0
    adapter_config = json.loads((latest(tmp_path) / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    from safetensors.torch import load_file
    adapters = load_file(latest(tmp_path) / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapters
    merged, _ = load_pretrained(tmp_path)                   # base + adapters merged, plain HF layout
    base, _ = load_pretrained(tiny_dir)
    assert torch.equal(merged.embed_tokens.weight, base.embed_tokens.weight)         # frozen
    assert not torch.equal(merged.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)
    # resume continues from base + saved adapters
    assert train.main([f"--out_dir={tmp_path}", "--max_steps=3", "--resume"]) == 0
    assert read_metrics(tmp_path)[-1]["step"] == 3


def test_peft_loads_the_lora_adapters(tiny_dir, tmp_path):
    """The ecosystem check: peft puts our adapters on transformers' model of the base checkpoint, and the
    result predicts what our merged checkpoint predicts."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    assert train.main(args(tiny_dir, tmp_path, lora_rank=4, lora_alpha=8, max_steps=2)) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    with_adapters = peft.PeftModel.from_pretrained(base, latest(tmp_path)).eval()
    merged, _ = load_pretrained(tmp_path)
    tokens = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        diff = (with_adapters(tokens).logits - merged(tokens)).abs().max().item()
    # W + s B A merged in fp32 against W x + s B (A x): roundings of weights ~0.05 and logits ~0.06, ~1e-8 (measured
    # 4e-9). The two steps' adapters move the logits by only 4e-5, so 1e-6, not more: adapters lost would pass 1e-4.
    assert diff <= 1e-6, f"peft + transformers vs our merged LoRA checkpoint: {diff:.2e}"


def test_glibc_mmap_threshold_is_fixed_unless_the_user_set_it(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1
    monkeypatch.setattr(machinery_run.sys, "platform", "linux")
    monkeypatch.setattr(machinery_run.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    machinery_run.fix_glibc_mmap_threshold()
    assert calls == []                                           # the user's own setting wins
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    machinery_run.fix_glibc_mmap_threshold()
    assert calls == [(-3, 1 << 20)]                              # M_MMAP_THRESHOLD is -3 in glibc's malloc.h

    def no_glibc(name):
        raise OSError(name)
    monkeypatch.setattr(machinery_run.ctypes, "CDLL", no_glibc)
    machinery_run.fix_glibc_mmap_threshold()                             # musl and others: nothing to do, no error


def test_the_smoke_preset_runs_the_whole_loop(tiny_dir, tmp_path, capsys):
    """--preset smoke at reduced size (the tiny model): a plain step, two thinking steps with LoRA on qstar.py's plain
    path, an evaluation with its controls, a checkpoint and the thoughts page."""
    cfg, qcfg, _ = train.parse_args(["--preset=smoke"])
    assert (cfg.max_steps, cfg.plain_steps, cfg.lora_rank, cfg.fast, qcfg.uses_levers) == (3, 1, 4, False, False)
    assert train.main(["--preset=smoke", f"--model={tiny_dir}", f"--out_dir={tmp_path}"]) == 0
    rows = read_metrics(tmp_path)
    assert [r.get("phase") for r in rows[1:]] == ["plain", "think", "think"] and EVAL_KEYS <= rows[-1].keys()
    assert (tmp_path / "thoughts.html").is_file() and checkpoint_step(tmp_path) == 3
    assert "3 steps (1 plain, 2 thinking)" in capsys.readouterr().out


@pytest.mark.parametrize("think_at", ["answers", "digits"])
def test_a_levers_run_trains_at_the_answers_with_a_warm_start(tiny_dir, tmp_path, think_at):
    """--preset answers at reduced size: one-problem windows, streams only before answers (their first digits, or
    every digit), the forced worked step for the first thinking step, then its fraction falling; the logs say where
    REINFORCE's streams were."""
    assert train.main(["--preset=answers", f"--model={tiny_dir}", f"--out_dir={tmp_path}", "--max_steps=4",
                       f"--think_at={think_at}",
                       "--plain_steps=1", "--plain_batch_size=2", "--batch_size=2", "--n_thoughts=3",
                       "--forced_steps=1", "--forced_decay=1", "--eval_interval=4", "--eval_answers=4",
                       "--eval_windows=1", "--save_interval=4", "--thought_len=3", "--n_true=2"]) == 0
    rows = read_metrics(tmp_path)[1:]
    assert [r["forced_streams"] for r in rows[1:]][::2] == [1.0, 0.0]     # forced 1, then 1/2, then 0
    assert rows[1]["answer_streams"] == 0.0 and rows[3]["answer_streams"] == 1.0   # REINFORCE: own samples only
    assert "eval_answer_post_diff" in rows[-1] and "eval_thought_accuracy" in rows[-1]


def test_a_run_kept_near_its_start_policy(tiny_dir, tmp_path):
    """--kl_to_start with --start_policy (the plain run the thinking run was copied from): the first thinking step's
    policy is the start's, so the log-ratio is exactly 0, and it moves once the policy has learnt; without
    --start_policy, one error line (exit 2)."""
    plain, thinking = tmp_path / "plain", tmp_path / "thinking"
    assert train.main(["--preset=answers", f"--model={tiny_dir}", f"--out_dir={plain}", "--max_steps=1",
                       "--plain_steps=1", "--plain_batch_size=2", "--eval_interval=1", "--eval_answers=2",
                       "--eval_windows=1", "--save_interval=1", "--thought_len=3", "--n_true=2",
                       "--n_thoughts=3"]) == 0
    shutil.copytree(plain, thinking)
    resume = [f"--out_dir={thinking}", "--resume", "--max_steps=3", "--batch_size=2", "--forced_steps=0",
              "--forced_decay=0", "--kl_to_start=0.1", "--eval_interval=3", "--save_interval=3",
              "--thought_temperature=0.5",
              "--lr=0.01", "--lr_markers=0.01", "--warmup_steps=1"]
    assert train.main(resume) == 2
    assert train.main(resume + [f"--start_policy={plain}"]) == 0
    rows = [r for r in read_metrics(thinking) if r.get("phase") == "think"]
    assert rows[0]["kl_to_start"] == 0.0 and rows[1]["kl_to_start"] != 0.0
