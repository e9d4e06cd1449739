"""Bad or unusual input to every script, written from the expected behaviour (issue: nothing lost, nothing silently
wrong): each case ends in one line on stderr that starts with "error:" and names the flag or the file, a non-zero
exit code, no traceback, and every file in the folders involved byte-identical afterwards. Then the two-process
cases: a second run on a live run's folder, SIGTERM, and Ctrl-C before training starts."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_model

import eval as qeval
import generate
import train
from machinery import checkpoint, gguf_import
from machinery import run as machinery_run
from machinery.hf_io import load_pretrained, save_pretrained, save_quietstar
from machinery.thoughts_page import thoughts_page_path
from qstar import QuietStar, QuietStarConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of things a user might point the scripts at: models, a finished run, data files, their own files."""
    w = tmp_path_factory.mktemp("world")
    _, tokenizer = load_pretrained("smollm2-135m")
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), window=None, std=0.05)
    model.config.eos_token_id = 2
    save_pretrained(model, tokenizer, w / "model")
    (w / "model" / "notes.txt").write_text("the user's notes\n")
    (w / "mine").mkdir()
    (w / "mine" / "precious.txt").write_text("do not delete\n")
    (w / "a_file").write_text("not a folder\n")
    run = ["--model", str(w / "model"), "--out_dir", str(w / "run"), "--max_steps=1", "--seq_len=16",
           "--eval_windows=1", "--thought_len=2", "--n_true=2"]
    assert train.main(run) == 0
    checkpoint = w / "run" / (w / "run" / "latest").read_text().strip()
    for name, damage in (("run_no_config", "train_config"), ("run_truncated", "truncate"), ("run_altered", "alter")):
        shutil.copytree(w / "run", w / name)
        folder = w / name / checkpoint.name
        if damage == "train_config":
            (folder / "train_config.json").unlink()
            manifest = json.loads((folder / "manifest.json").read_text())
            del manifest["files"]["train_config.json"]
            (folder / "manifest.json").write_text(json.dumps(manifest))
        elif damage == "truncate":
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
        else:                                           # one bit of one weight flipped: the same size
            data = bytearray((folder / "model.safetensors").read_bytes())
            data[-3] ^= 0x10
            (folder / "model.safetensors").write_bytes(bytes(data))
    shutil.copytree(w / "model", w / "truncated")
    data = (w / "truncated" / "model.safetensors").read_bytes()
    (w / "truncated" / "model.safetensors").write_bytes(data[:1000])
    qs = QuietStar(model, QuietStarConfig(thought_len=2), tokenizer)
    save_quietstar(qs, w / "no_parts", tokenizer)
    (w / "no_parts" / "quietstar.safetensors").unlink()
    save_quietstar(qs, w / "wrong_parts", tokenizer)
    (w / "wrong_parts" / "quietstar.json").write_text(json.dumps({"thought_len": 2, "mixing_hidden": 7}))
    (w / "empty.jsonl").write_text("")
    (w / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (w / "one_doc.jsonl").write_text(json.dumps({"text": "only one document here " * 20}) + "\n")
    (w / "csqa.jsonl").write_text(json.dumps({"question": "Q?", "choices": {"label": ["A"], "text": ["a"]},
                                              "answerKey": "A"}) + "\n")
    (w / "c4.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(5)))
    (w / "fake.gguf").write_bytes(b"not really a gguf file")
    return w


def snapshot(folder):
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def T(*argv):
    return ("train", list(argv))


def E(*argv):
    return ("eval", list(argv))


def G(*argv):
    return ("generate", list(argv))


def I(*argv):  # noqa: E743
    return ("gguf_import", list(argv))


MAIN = {"train": train.main, "eval": qeval.main, "generate": generate.main, "gguf_import": gguf_import.main}
M = "--model={w}/model"
# (script and argv ({w} is the world folder), what the one-line message must contain)
CASES = [
    # train.py: numbers out of range, named with their allowed range
    (T("--max_steps=0"), "--max_steps must be at least 1"),
    (T("--batch_size=0"), "--batch_size must be at least 1"),
    (T("--grad_accum=0"), "--grad_accum must be at least 1"),
    (T("--seq_len=1"), "--seq_len must be at least 2"),
    (T("--eval_interval=0"), "--eval_interval must be at least 1"),
    (T("--save_interval=0"), "--save_interval must be at least 1"),
    (T("--eval_windows=0"), "--eval_windows must be at least 1"),
    (T("--thought_len=0"), "--thought_len must be at least 1"),
    (T("--n_thoughts=0"), "--n_thoughts must be at least 1"),
    (T("--n_true=0"), "--n_true must be at least 1"),
    (T("--lr=-1"), "--lr must be 0 or more"),
    (T("--lr_markers=-0.1"), "--lr_markers must be 0 or more"),
    (T("--grad_clip=0"), "--grad_clip must be positive"),
    (T("--grad_clip=-1"), "--grad_clip must be positive"),
    (T("--thought_temperature=0"), "--thought_temperature must be positive"),
    (T("--marker_grad_scale=0"), "--marker_grad_scale must be positive"),
    (T("--base_loss_weight=2"), "--base_loss_weight must be between 0 and 1"),
    (T("--bare_fraction=1.5"), "--bare_fraction must be between 0 and 1"),
    (T("--plain_steps=50"), "--plain_steps must be between 0 and --max_steps (40)"),
    (T("--preset=gpu"), "--preset must be one of ['answers', 'cpu', 'entropy', 'paper', 'smoke', 'think']"),
    (T("--max_steps=ten"), "argument --max_steps: invalid int value: 'ten'"),
    (T("--resume=maybe"), "--resume=maybe: write --resume, --no-resume, or --resume=true / --resume=false"),
    (T("--no-resume=1"), "--no-resume=1: write --resume, --no-resume, or --resume=true / --resume=false"),
    (T("--no_such_key=3"), "unrecognized arguments: --no_such_key=3"),
    # train.py: the run folder
    (T(M, "--out_dir={w}/a_file"), "--out_dir {w}/a_file is a file"),
    (T(M, "--out_dir={w}/model"), "--out_dir {w}/model is the --model folder itself"),
    (T("--out_dir={w}/model"), "--out_dir {w}/model holds a model that train.py did not write"),
    (T(M, "--out_dir={w}/run"), "--out_dir {w}/run already holds a checkpoint at step 1. Continue it with --resume"),
    (T("--out_dir={w}/mine", "--resume"), "--resume but {w}/mine holds no checkpoint"),
    (T("--out_dir={w}/run", "--resume", "--thought_len=5"), "--resume cannot change --thought_len 2 -> 5"),
    (T("--out_dir={w}/run", "--resume", "--model=other"), "--resume cannot change --model"),
    (T("--out_dir={w}/run_no_config", "--resume"), "train_config.json is missing"),
    (T("--out_dir={w}/run_truncated", "--resume"), "model.safetensors is missing or has the wrong size"),
    (T("--out_dir={w}/run_altered", "--resume"), "model.safetensors does not match its SHA-256 in manifest.json"),
    # train.py: devices, data and models
    (T(M, "--out_dir={w}/new", "--device=cuda"), "--device cuda but this machine has no CUDA GPU"),
    (T(M, "--out_dir={w}/new", "--device=tpu9"), "--device 'tpu9' is not a device"),
    (T(M, "--out_dir={w}/new", "--data={w}/empty.jsonl"), "--data {w}/empty.jsonl: the file holds no documents"),
    (T(M, "--out_dir={w}/new", "--data={w}/bad.jsonl"), "{w}/bad.jsonl:2: not a JSON line"),
    (T(M, "--out_dir={w}/new", "--data={w}/one_doc.jsonl"), "--data {w}/one_doc.jsonl has 1 document"),
    (T(M, "--out_dir={w}/new", "--data={w}/csqa.jsonl"), "{w}/csqa.jsonl:1: a row needs a 'text' field"),
    (T(M, "--out_dir={w}/new", "--data={w}/no/such.jsonl"), "data file '{w}/no/such.jsonl' does not exist"),
    (T("--model={w}/truncated", "--out_dir={w}/new"), "cannot read {w}/truncated/model.safetensors"),
    (T("--model={w}/typo", "--out_dir={w}/new"), "model folder '{w}/typo' does not exist"),
    (T(M, "--out_dir={w}/new", "--data={w}/c4.jsonl", "--seq_len=4000"), "has only"),
    # eval.py
    (E(M, "--task=gsm8k", "--data={w}/c4.jsonl", "--limit=0"), "argument --limit: must be at least 1, got 0"),
    (E(M, "--task=gsm8k", "--data={w}/c4.jsonl", "--limit=-1"), "argument --limit: must be at least 1, got -1"),
    (E(M, "--task=gsm8k_gen", "--data={w}/c4.jsonl", "--votes=0"), "argument --votes: must be at least 1"),
    (E(M, "--task=nll", "--data={w}/c4.jsonl", "--batch_size=0"), "argument --batch_size: must be at least 1"),
    (E(M, "--task=nll", "--data=arithmetic", "--bare_fraction=2"), "--bare_fraction must be between 0 and 1"),
    (E(M, "--task=nll", "--data={w}/c4.jsonl", "--out={w}/nowhere/r.json"), "--out {w}/nowhere/r.json: the folder"),
    (E(M, "--task=nll", "--data={w}/c4.jsonl", "--out={w}/mine"), "--out {w}/mine is a folder"),
    (E(M, "--task=nll", "--data={w}/csqa.jsonl"), "--data {w}/csqa.jsonl: row 1: a row needs a 'text' field"),
    (E(M, "--task=csqa", "--data={w}/empty.jsonl"), "--data {w}/empty.jsonl: the file holds no rows"),
    (E(M, "--task=gsm8k", "--data={w}/c4.jsonl"), "--data {w}/c4.jsonl does not look like gsm8k data"),
    (E(M, "--task=gsm8k", "--data={w}/bad.jsonl"), "{w}/bad.jsonl:2: not a JSON line"),
    (E(M, "--task=gsm8k", "--data={w}/none.jsonl"), "--data '{w}/none.jsonl' is not a file"),
    (E("--model={w}/run_altered", "--task=nll", "--data={w}/c4.jsonl"), "model.safetensors does not match its SHA"),
    (G("--model={w}/run_altered"), "model.safetensors does not match its SHA-256"),
    (E("--model={w}/no_parts", "--task=nll", "--data={w}/c4.jsonl"), "{w}/no_parts/quietstar.safetensors is missing"),
    (E("--model={w}/wrong_parts", "--task=nll", "--data={w}/c4.jsonl"), "has shape"),
    (E(M, "--task=nll", "--data={w}/c4.jsonl", "--device=cuda"), "--device cuda but this machine has no CUDA GPU"),
    (E(M, "--task=nll", "--data={w}/c4.jsonl", "--thought_len=0"), "argument --thought_len: must be at least 1"),
    (E(M, "--task=thoughts", "--data={w}/c4.jsonl", "--out={w}/nowhere/p.html"), "--out {w}/nowhere/p.html"),
    # generate.py
    (G(M, "--temperature=-1"), "argument --temperature: must be at least 0.0, got -1"),
    (G(M, "--prompt="), "--prompt is empty"),
    (G(M, "--max_new_tokens=0"), "argument --max_new_tokens: must be at least 1"),
    (G(M, "--thought_len=0"), "argument --thought_len: must be at least 1"),
    (G("--model={w}/nope"), "model folder '{w}/nope' does not exist"),
    (G(M, "--thinking=sometimes"), "--thinking=sometimes: write --thinking, --no-thinking, or --thinking=true"),
    # gguf_import.py
    (I("{w}/fake.gguf", "{w}/mine"), "{w}/mine is not empty and is not an earlier gguf_import output"),
    (I("{w}/fake.gguf", "{w}/model"), "{w}/model is not empty and is not an earlier gguf_import output"),
    (I("{w}/fake.gguf", "{w}/a_file"), "{w}/a_file is a file"),
    (I("{w}/missing.gguf", "{w}/fresh"), "{w}/missing.gguf: no such file"),
]


@pytest.mark.parametrize("call,message", CASES, ids=[f"{c[0][0]}:{' '.join(c[0][1])[:60]}" for c in CASES])
def test_bad_input_gets_one_clear_line_and_changes_nothing(world, call, message, capsys, monkeypatch):
    script, argv = call
    monkeypatch.chdir(world)
    argv = [a.replace("{w}", str(world)) for a in argv]
    before = snapshot(world)
    try:
        code = MAIN[script](argv)
    except SystemExit as e:                      # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code not in (0, None), err
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert message.replace("{w}", str(world)) in err, err
    assert snapshot(world) == before
    assert not (world / "new").exists() and not (world / "fresh").exists()


def test_thoughts_page_of_a_built_in_model_does_not_shadow_its_name(world, monkeypatch):
    monkeypatch.chdir(world)
    args = qeval.build_parser().parse_args(["--task=thoughts", "--data=arithmetic"])
    assert thoughts_page_path(args) == Path("thoughts-smollm2-135m.html")
    args = qeval.build_parser().parse_args([f"--model={world}/run", "--task=thoughts", "--data=arithmetic"])
    assert thoughts_page_path(args) == world / "run" / "thoughts.html"


# ---- two processes -------------------------------------------------------------------------------------------

def start_run(world, out_dir, *extra):
    argv = [f"--model={world}/model", f"--out_dir={out_dir}", "--max_steps=100000", "--save_interval=100000",
            "--eval_interval=100000", "--seq_len=16", "--eval_windows=1", "--thought_len=2", "--n_true=2", *extra]
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited "ignore": give the run the
    # default disposition a terminal gives it, so that Ctrl-C reaches it wherever the tests run.
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.1)
    assert condition()


def metrics_rows(out_dir):
    f = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def test_a_second_run_on_a_live_folder_is_refused_and_sigterm_saves(world, tmp_path, capsys):
    out_dir = tmp_path / "live"
    first = start_run(world, out_dir)
    try:
        wait_for(lambda: len(metrics_rows(out_dir)) >= 3)
        code = train.main([f"--model={world}/model", f"--out_dir={out_dir}", "--max_steps=1"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == (f"error: --out_dir {out_dir} is in use by another run (pid {first.pid}); wait "
                                     "for it to finish or choose another --out_dir")
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, output
    assert "SIGTERM: saving a checkpoint" in output and "Traceback" not in output
    step = checkpoint.checkpoint_step(out_dir)
    assert step >= 2 and metrics_rows(out_dir)[-1]["step"] == step
    assert not list(out_dir.glob(".tmp-*")) and not (out_dir / ".lock").exists()
    assert sorted(f.name for f in out_dir.iterdir()) == [f"checkpoint-{step:06d}", "latest", "metrics.jsonl"]
    load_pretrained(out_dir)


def test_a_killed_run_leaves_no_stale_lock(world, tmp_path):
    out_dir = tmp_path / "killed"
    first = start_run(world, out_dir, "--save_interval=1")
    wait_for(lambda: checkpoint.checkpoint_step(out_dir) is not None)
    first.kill()
    first.wait()
    assert train.main([f"--out_dir={out_dir}", "--resume", f"--max_steps={checkpoint.checkpoint_step(out_dir) + 1}"]) == 0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_before_training_starts(world, tmp_path, sig, code):
    out_dir = tmp_path / "early"
    proc = start_run(world, out_dir)
    wait_for(lambda: (out_dir / ".lock").exists(), seconds=60)            # the model is being loaded
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, output                                # 128 + the signal's number
    assert "Traceback" not in output
    assert not (out_dir / "latest").exists()


def test_a_stop_request_outlives_a_lost_keyboard_interrupt(capsys):
    """Before training a Ctrl-C or SIGTERM stops the run at once; if its KeyboardInterrupt is lost inside library
    code (it was, in lazy imports while the model loaded), the recorded signal still stops the run before the first
    step. While training: the first Ctrl-C or SIGTERM only asks to stop after the step, and decides the exit code;
    a second Ctrl-C quits at once, a second SIGTERM does not."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    single = machinery_run.parallel.Ranks()
    with machinery_run.StopRequest() as stop:
        assert signal.getsignal(signal.SIGINT) == stop.handle
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGTERM, None)
        # ...and suppose a library swallowed that exception: loading goes on
        with pytest.raises(KeyboardInterrupt) as raised:
            stop.check()
        assert raised.value.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            stop.start_training(single)
    for first, second, name in ((signal.SIGINT, signal.SIGTERM, "Ctrl-C"), (signal.SIGTERM, signal.SIGTERM, "SIGTERM")):
        with machinery_run.StopRequest() as stop:               # while training: the first signal, then another
            stop.check()
            stop.start_training(single)
            stop.handle(first, None)
            stop.handle(second, None)
            assert stop.signal == first
            assert capsys.readouterr().out.count(f"{name}: saving a checkpoint after this step") == 1
            with pytest.raises(KeyboardInterrupt):
                stop.handle(signal.SIGINT, None)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_ctrl_c_while_taking_the_run_lock_leaves_no_lock(tmp_path, monkeypatch):
    out_dir = tmp_path / "new"

    class OsWithACtrlC:                                                    # lands after the lock is taken
        def __getattr__(self, name):
            return getattr(os, name)

        def getpid(self):
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "os", OsWithACtrlC())
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.RunLock(out_dir):
            pass
    assert not out_dir.exists()                                           # the folder it made, and the lock, gone
