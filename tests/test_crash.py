"""A run that survives anything: SIGKILL at random moments and in each phase of a checkpoint write, resumed each
time, ends with the weights of the uninterrupted run; a checkpoint write that fails (disk full, read-only folder,
a rename refused) ends in one line and keeps the previous checkpoint as `latest`."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_model, word_tokenizer
from safetensors.torch import load_file

import train
from machinery import checkpoint
from machinery.hf_io import load_quietstar, save_pretrained

STEPS = 12
KEYS = ("loss", "nll_base", "nll_talk", "reinforce", "reward_mean", "grad_norm")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("crash")
    save_pretrained(tiny_model(37, window=None, std=0.1), word_tokenizer(36), w / "model")
    docs = [" ".join(f"w{(13 * d + 5 * i) % 30 + 4}" for i in range(300)) for d in range(4)]
    (w / "docs.txt").write_text("\n\n".join(docs))
    return w


def argv(world, out_dir, max_steps=STEPS, resume=False):
    # --threads=1 in every run: the same reduction order in every process, so resumed runs are bit-identical.
    return [f"--model={world / 'model'}", f"--data={world / 'docs.txt'}", f"--out_dir={out_dir}", "--device=cpu",
            "--seq_len=12", "--thought_len=2", "--n_true=2", f"--max_steps={max_steps}", "--eval_interval=2",
            "--eval_windows=2", "--save_interval=1", "--lr=1e-3", "--threads=1", *(["--resume"] if resume else [])]


def in_process(args: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return train.main(args)
    finally:
        torch.set_num_threads(threads)                  # --threads=1 must not slow the rest of the suite


def weights(out_dir) -> dict:
    folder = checkpoint.latest_checkpoint(out_dir)
    return load_file(folder / "model.safetensors") | load_file(folder / "quietstar.safetensors")


def metric_rows(out_dir):
    return [{k: r[k] for k in KEYS} for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world / "uninterrupted"
    started = time.time()
    assert in_process(argv(world, out)) == 0
    return out, time.time() - started


def launch(world, out_dir, crash_at: str | None = None) -> subprocess.Popen:
    resume = checkpoint.latest_checkpoint(out_dir) is not None
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("QUIETSTAR_CRASH_AT", None)
    if crash_at:
        env["QUIETSTAR_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv(world, out_dir, resume=resume)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rewritten_since(out_dir, moment: float) -> bool:
    """The run has loaded and rewritten metrics.jsonl (MetricsLog keeps the rows up to its checkpoint)."""
    f = out_dir / "metrics.jsonl"
    return f.exists() and f.stat().st_mtime > moment


def logged_step(out_dir) -> int:
    f = out_dir / "metrics.jsonl"
    lines = f.read_text().splitlines() if f.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=-1)


def assert_consistent(out_dir):
    """After a kill: `latest`, if there is one, names a checkpoint whose every file matches its manifest, and
    nothing but temporary folders (cleared by the next start) is half-written."""
    if (out_dir / "latest").exists():
        checkpoint.verify_checkpoint(out_dir)
    for f in out_dir.iterdir():
        assert f.name in ("latest", "metrics.jsonl", "thoughts.html", ".lock", ".latest.tmp") or \
            f.name.startswith((".tmp-checkpoint-", "checkpoint-")), f.name


def test_sigkill_anywhere_then_resume_ends_with_the_uninterrupted_weights(world, uninterrupted):
    reference, seconds = uninterrupted
    out = world / "killed"
    kills, rng = [], random.Random(20)
    # The kill points: each phase of a checkpoint write (checkpoint.crash_point), the 2nd evaluation of a run, and
    # 8 random moments: 2 while the process starts (imports, loading), 6 once it trains (it has rewritten
    # metrics.jsonl and logged the step it resumed from or the next one), a random part of a step's time later:
    # in a step, an evaluation or a checkpoint write.
    planned = ["files", "manifest", "renamed", "pointer", "switched", "eval:2"] + ["start", *["train"] * 3] * 2
    for crash_at in planned:
        before = checkpoint.checkpoint_step(out)
        launched = time.time()
        proc = launch(world, out, crash_at if crash_at not in ("start", "train") else None)
        try:
            if crash_at == "start":
                time.sleep(rng.uniform(0.3, 2.0))
                proc.kill()
            elif crash_at == "train":
                target = min(rng.randint(before or 0, (before or 0) + 1), STEPS - 2)
                while proc.poll() is None and not (rewritten_since(out, launched) and logged_step(out) >= target):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0, seconds / STEPS / 2))   # less than a step (seconds has loading too)
                proc.kill()
            output, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == -signal.SIGKILL, output[-3000:]
        kills.append((crash_at, before, checkpoint.checkpoint_step(out)))
        assert_consistent(out)
    assert launch(world, out).wait(timeout=300) == 0                  # the last resume, not killed
    print(f"\n{len(kills)} kills survived (kind, checkpoint step before, after): {kills}")
    assert not list(out.glob(".tmp*")) and not list(out.glob(".latest.tmp")) and not (out / ".lock").exists()
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{STEPS:06d}", "latest", "metrics.jsonl",
                                                     "thoughts.html"]
    # exactly: every run has one thread (--threads=1), the same batch shapes and the same order of sums, and resumes
    # from weights and optimizer state saved bit for bit, so the same floating-point operations run everywhere
    ours, theirs = weights(out), weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert metric_rows(out) == metric_rows(reference)


def test_crash_points_kill_where_they_say(world, tmp_path):
    """Each phase's kill leaves the state it names: before the rename no checkpoint, after the switch the new
    one as `latest` (so the crash loop above really covers every phase)."""
    expect = {"files": None, "manifest": None, "renamed": None, "pointer": None, "switched": 1}
    for phase, step in expect.items():
        out = tmp_path / phase
        proc = launch(world, out, phase)
        assert proc.wait(timeout=300) == -signal.SIGKILL, proc.communicate()[0][-2000:]
        assert checkpoint.checkpoint_step(out) == step, phase
        leftovers = {p.name.split("-")[0] for p in out.iterdir()}
        assert (".tmp" in leftovers) == (phase in ("files", "manifest")), (phase, leftovers)
        assert ("checkpoint" in leftovers) == (phase != "files" and phase != "manifest"), (phase, leftovers)


# ---- a checkpoint write that fails ---------------------------------------------------------------------------

def fail_on(monkeypatch, module, name, error_number, path_arg):
    """module.name raises OSError(error_number) when its path argument names the step-2 checkpoint's files."""
    real = getattr(module, name)

    def failing(*args, **kwargs):
        path = str(args[path_arg])
        if "checkpoint-000002" in path or path.endswith(".latest.tmp"):
            raise OSError(error_number, os.strerror(error_number), path)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, failing)


FAILURES = {
    # a file of the new checkpoint cannot be written: the disk is full
    "disk full": (torch, "save", errno.ENOSPC, 1),
    # the folder turned read-only between two saves: the finished folder cannot be renamed into place
    "read-only": (os, "rename", errno.EROFS, 0),
    # the `latest` pointer cannot be replaced (a file another process holds, a permission taken away)
    "pointer": (os, "replace", errno.EPERM, 0),
}


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failed_checkpoint_write_ends_in_one_line_and_keeps_the_previous_one(world, tmp_path, monkeypatch,
                                                                               capsys, kind):
    out = tmp_path / "run"
    assert in_process(argv(world, out, max_steps=1)) == 0
    capsys.readouterr()
    module, name, number, path_arg = FAILURES[kind]
    with monkeypatch.context() as m:
        fail_on(m, module, name, number, path_arg)
        assert in_process(argv(world, out, max_steps=3, resume=True)) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: could not write the checkpoint of step 2"), err
    assert os.strerror(number) in err and "Not saved; the latest checkpoint is still step 1" in err, err
    assert checkpoint.checkpoint_step(out) == 1 and checkpoint.verify_checkpoint(out).name == "checkpoint-000001"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "latest", "metrics.jsonl", "thoughts.html"]
    assert in_process(argv(world, out, max_steps=2, resume=True)) == 0     # and the run goes on from step 1


def error_line(stderr: str) -> str:
    """The one error line among the progress bars (tqdm draws on stderr, with carriage returns)."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk(world, tmp_path, capsys):
    """The same on a real full file system: a small tmpfs (needs root, as CI has), filled after step 1."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        assert in_process(argv(world, out, max_steps=1)) == 0
        checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.latest_checkpoint(out).iterdir())
        filler = disk / "filler"
        with open(filler, "wb") as f:                 # fill the disk, then free half a checkpoint's worth
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        os.truncate(filler, filler.stat().st_size - checkpoint_bytes // 2)
        capsys.readouterr()
        assert in_process(argv(world, out, max_steps=3, resume=True)) == 1
        err = error_line(capsys.readouterr().err)
        assert "could not write the checkpoint of step 2" in err, err
        assert "No space left on device" in err and "the latest checkpoint is still step 1" in err, err
        assert checkpoint.verify_checkpoint(out).name == "checkpoint-000001"
        assert not list(out.glob(".tmp*")) and not list(out.glob("checkpoint-000002"))
        filler.unlink()
        assert in_process(argv(world, out, max_steps=2, resume=True)) == 0
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)    # lazy: a loaded tensor may still map a file


def test_a_checkpoint_altered_after_writing_is_refused_by_name(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert in_process(argv(world, out, max_steps=1)) == 0
    target = checkpoint.latest_checkpoint(out) / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01                                    # one bit of one weight: the size is unchanged
    target.write_bytes(bytes(data))
    capsys.readouterr()
    assert in_process(argv(world, out, max_steps=2, resume=True)) == 2
    err = error_line(capsys.readouterr().err)
    assert err == (f"error: checkpoint {target.parent}: model.safetensors does not match its SHA-256 in "
                   "manifest.json: it was modified after step 1 was written"), err
    with pytest.raises(Exception, match="model.safetensors does not match its SHA-256"):
        load_quietstar(out)
    with pytest.raises(Exception, match="model.safetensors does not match its SHA-256"):
        load_quietstar(target.parent)       # the checkpoint folder itself
