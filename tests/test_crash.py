"""A run that survives anything: SIGKILL at random moments and in each phase of a checkpoint write, resumed each
time, ends with the weights of the uninterrupted run; a checkpoint write that fails for the storage's sake (disk
full in any writer, quota, read-only folder, a rename refused), or that cannot fit in the free space, ends in one
line and keeps the previous checkpoint as `latest`, on injected errors and on a real small file system; a bug in the
write keeps its traceback."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_model, word_tokenizer
from safetensors.torch import load_file

import train
from machinery import checkpoint, hf_io
from machinery.cli import UsageError
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

NO_SPACE = os.strerror(errno.ENOSPC)


def oserror(number):
    return lambda path: OSError(number, os.strerror(number), path)


def safetensors_no_space(path):
    """What safetensors 0.8 raises when the disk fills while it writes (seen on a full tmpfs)."""
    from safetensors import SafetensorError
    return SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error {errno.ENOSPC})")


def torch_save_no_space(path):
    """What torch.save into a Python file raises when the disk fills (seen on a full tmpfs): its own RuntimeError,
    raised while handling the file's OSError."""
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    error.__context__ = OSError(errno.ENOSPC, NO_SPACE)         # as raising it in an `except OSError:` would
    return error


def fail_on(monkeypatch, module, name, path_arg, file_name, error):
    """module.name raises error(path) when its path argument (or its file's name) is file_name in the step-2
    checkpoint's write (its temporary folder, or the `latest` pointer's temporary file)."""
    real = getattr(module, name)

    def failing(*args, **kwargs):
        target = args[path_arg]
        path = str(target.name if hasattr(target, "write") else target)     # a path, or a file open on one
        if ("checkpoint-000002" in path or path.endswith(".latest.tmp")) and path.endswith(file_name):
            raise error(path)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, failing)


# Each writer of a checkpoint failing for the storage's sake: (module, function, path argument, file, error, the
# errno whose text the line must give)
WRITE_FAILURES = {
    # the disk fills while each file is written, each writer saying so its own way
    "model.safetensors": (hf_io, "save_file", 1, "model.safetensors", safetensors_no_space, errno.ENOSPC),
    "quietstar.safetensors": (hf_io, "save_file", 1, "quietstar.safetensors", safetensors_no_space, errno.ENOSPC),
    "train_state.pt": (torch, "save", 1, "train_state.pt", torch_save_no_space, errno.ENOSPC),
    "config.json": (Path, "write_text", 0, "/config.json", oserror(errno.ENOSPC), errno.ENOSPC),
    "train_config.json": (Path, "write_text", 0, "train_config.json", oserror(errno.ENOSPC), errno.ENOSPC),
    "manifest.json": (Path, "write_text", 0, "manifest.json", oserror(errno.ENOSPC), errno.ENOSPC),
    "latest": (Path, "write_text", 0, ".latest.tmp", oserror(errno.ENOSPC), errno.ENOSPC),
    # over quota while writing train_config.json
    "quota": (Path, "write_text", 0, "train_config.json", oserror(errno.EDQUOT), errno.EDQUOT),
    # the folder turned read-only between two saves: the finished folder cannot be renamed into place
    "read-only": (os, "rename", 0, "", oserror(errno.EROFS), errno.EROFS),
    # the `latest` pointer cannot be replaced (a permission taken away)
    "pointer": (os, "replace", 0, "", oserror(errno.EPERM), errno.EPERM),
}


@pytest.fixture(scope="module")
def at_step_1(world):
    """A run folder holding the checkpoint of step 1, copied by each test below."""
    out = world / "step1"
    assert in_process(argv(world, out, max_steps=1)) == 0
    return out


def assert_refused(out, err: str, cause: str):
    """The one line of a checkpoint write that failed: what, where, why, what is kept, how to go on; and the folder
    holds the step-1 checkpoint as `latest` and nothing half-written."""
    assert err.startswith(f"error: could not write the checkpoint of step 2 in {out} ("), err
    assert cause in err and "Not saved; the latest checkpoint is still step 1" in err, err
    assert err.endswith(f"continue with: python train.py --out_dir {out} --resume"), err
    assert checkpoint.checkpoint_step(out) == 1 and checkpoint.verify_checkpoint(out).name == "checkpoint-000001"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "latest", "metrics.jsonl", "thoughts.html"]


def space_named(err: str) -> tuple[float, float]:
    """(needed, free) in bytes from "it needs about 1.26 MiB, 512.00 KiB free"."""
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    found = re.search(r"it needs about ([\d.]+) (\w+), ([\d.]+) (\w+) free", err)
    assert found, err
    return float(found[1]) * units[found[2]], float(found[3]) * units[found[4]]


@pytest.mark.parametrize("kind", WRITE_FAILURES)
def test_a_failed_checkpoint_write_ends_in_one_line_and_keeps_the_previous_one(world, at_step_1, tmp_path,
                                                                               monkeypatch, capsys, kind):
    out = tmp_path / "run"
    shutil.copytree(at_step_1, out)
    capsys.readouterr()
    module, name, path_arg, file_name, error, number = WRITE_FAILURES[kind]
    with monkeypatch.context() as m:
        fail_on(m, module, name, path_arg, file_name, error)
        assert in_process(argv(world, out, max_steps=3, resume=True)) == 1
    err = error_line(capsys.readouterr().err)
    assert_refused(out, err, os.strerror(number))
    if number in (errno.ENOSPC, errno.EDQUOT):          # the space needed and free are named
        needed, free = space_named(err)
        assert needed > 0 and free > 0, err
    assert in_process(argv(world, out, max_steps=2, resume=True)) == 0     # and the run goes on from step 1
    assert checkpoint.checkpoint_step(out) == 2


BUGS = {
    # a mistake in the code that writes, not the storage: safetensors refusing a tensor, a file in a missing folder
    "ValueError": (hf_io, "save_file", 1, "model.safetensors",
                   lambda path: ValueError("You are trying to save a non contiguous tensor")),
    "ENOENT": (Path, "write_text", 0, "train_config.json", oserror(errno.ENOENT)),
    # torch.save's RuntimeError with no OSError behind it
    "RuntimeError": (torch, "save", 1, "train_state.pt", lambda path: RuntimeError("unexpected pos 576 vs 534")),
}


@pytest.mark.parametrize("kind", BUGS)
def test_a_bug_in_a_checkpoint_write_keeps_its_traceback(world, at_step_1, tmp_path, monkeypatch, kind):
    out = tmp_path / "run"
    shutil.copytree(at_step_1, out)
    module, name, path_arg, file_name, error = BUGS[kind]
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="a bug, not the storage") as raised:
        fail_on(m, module, name, path_arg, file_name, error)
        in_process(argv(world, out, max_steps=3, resume=True))
    assert type(raised.value.__cause__).__name__ == kind.replace("ENOENT", "FileNotFoundError")
    assert checkpoint.verify_checkpoint(out).name == "checkpoint-000001"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "latest", "metrics.jsonl", "thoughts.html"]


STORAGE_CAUSES = [
    (OSError(errno.ENOSPC, NO_SPACE), errno.ENOSPC),
    (safetensors_no_space("x"), errno.ENOSPC),
    (torch_save_no_space("x"), errno.ENOSPC),
    (Exception(f"{NO_SPACE} (os error {errno.ENOSPC})"), errno.ENOSPC),        # tokenizers' save, from Rust
    (Exception(f"I/O error: {os.strerror(errno.EDQUOT)} (os error {errno.EDQUOT})"), errno.EDQUOT),
    (RuntimeError(f"write failed: {os.strerror(errno.EIO)}"), errno.EIO),          # only the errno's text
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), errno.EROFS),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), errno.EACCES),
    (ValueError("You are trying to save a non contiguous tensor"), None),
    (RuntimeError("unexpected pos 576 vs 534"), None),
    (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)), None),
    (Exception("I/O error: Is a directory (os error 21)"), None),
]


@pytest.mark.parametrize("error, number", STORAGE_CAUSES, ids=lambda x: repr(x)[:40])
def test_a_storage_error_is_told_from_a_bug_by_its_cause(error, number):
    assert checkpoint.storage_errno(error) == number
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = error                                  # raise ... from error
    assert checkpoint.storage_errno(wrapped) == number


def error_line(stderr: str) -> str:
    """The one error line among the progress bars (tqdm draws on stderr, with carriage returns)."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# ---- on a real small file system -------------------------------------------------------------------------------

@pytest.fixture
def disk(tmp_path):
    """A fresh 8 MiB tmpfs (a real file system that fills), unmounted after the test; skipped where this process
    may not mount one (mount needs root or CAP_SYS_ADMIN, as CI has)."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield path
    subprocess.run(["umount", "--lazy", str(path)], check=False)    # lazy: a loaded tensor may still map a file


PAGE = 4096                                                   # a tmpfs gives each file whole pages


def fill(filler, leave: int):
    """Fill the file system of `filler` to the last byte, then free `leave` bytes of it."""
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, filler.stat().st_size - leave)


def test_a_full_disk_is_refused_before_writing(world, disk, capsys):
    """A disk with less free space than the next checkpoint needs: refused before a byte is written, naming the
    space needed and free; once space is freed the run goes on."""
    out = disk / "run"
    assert in_process(argv(world, out, max_steps=1)) == 0
    checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.latest_checkpoint(out).iterdir())
    filler = disk / "filler"
    fill(filler, checkpoint_bytes // 2)                        # half a checkpoint's worth free
    capsys.readouterr()
    assert in_process(argv(world, out, max_steps=3, resume=True)) == 1
    err = error_line(capsys.readouterr().err)
    assert_refused(out, err, "not enough free space")
    needed, free = space_named(err)
    # the free space named is the disk's: as now, less the page of the run's .lock (a tmpfs file takes whole 4 KiB
    # pages; the lock went as the run ended), to the message's two decimals of a KiB (5 bytes)
    assert abs(free - (shutil.disk_usage(disk).free - PAGE)) <= 5, err
    assert needed >= checkpoint_bytes > free, err              # what is needed covers a checkpoint
    filler.unlink()
    assert in_process(argv(world, out, max_steps=2, resume=True)) == 0
    assert checkpoint.checkpoint_step(out) == 2


# Which file the disk fills in, as the write goes: written before it (model.safetensors first)
WRITTEN_BEFORE = {"model.safetensors": (), "train_state.pt": ("model.safetensors", "config.json", "tokenizer.json",
                                                              "quietstar.safetensors", "quietstar.json",
                                                              "train_config.json")}


@pytest.mark.parametrize("full_in", WRITTEN_BEFORE)
def test_a_disk_that_fills_during_the_write(world, disk, monkeypatch, capsys, full_in):
    """The disk fills while a file is being written (another process took the space just after the check): the
    writer's own error (safetensors', torch.save's) ends in the one line, and the run resumes once space is freed."""
    out = disk / "run"
    assert in_process(argv(world, out, max_steps=1)) == 0
    sizes = {f.name: f.stat().st_size for f in checkpoint.latest_checkpoint(out).iterdir()}
    leave = sum(-(-sizes[name] // PAGE) * PAGE for name in WRITTEN_BEFORE[full_in]) + sizes[full_in] // 2
    filler, real_usage = disk / "filler", shutil.disk_usage
    seen = []                                                 # the errors the writers raised

    def usage_then_fill(path):                                # the check sees the space, then another process
        usage = real_usage(path)                              # takes it all but `leave` bytes
        if not filler.exists():
            fill(filler, leave)
        return usage

    def watched(module, name):
        real = getattr(module, name)

        def writer(*args, **kwargs):
            try:
                return real(*args, **kwargs)
            except Exception as e:
                seen.append(type(e).__name__)
                raise
        monkeypatch.setattr(module, name, writer)
    watched(hf_io, "save_file")
    watched(torch, "save")
    monkeypatch.setattr(shutil, "disk_usage", usage_then_fill)
    capsys.readouterr()
    assert in_process(argv(world, out, max_steps=3, resume=True)) == 1
    monkeypatch.undo()
    assert seen == [{"model.safetensors": "SafetensorError", "train_state.pt": "RuntimeError"}[full_in]]
    err = error_line(capsys.readouterr().err)
    assert_refused(out, err, NO_SPACE)
    needed, free = space_named(err)
    # the free space named is what the partial files left when they went: `leave`, to a page (the filler's
    # truncated end)
    assert needed > free and abs(free - leave) <= PAGE, err
    filler.unlink()
    assert in_process(argv(world, out, max_steps=2, resume=True)) == 0
    assert checkpoint.checkpoint_step(out) == 2


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


def test_a_newer_format_version_is_refused_in_one_line_and_a_manifest_without_one_loads(world, at_step_1, tmp_path,
                                                                                        capsys):
    """manifest.json records checkpoint.FORMAT_VERSION. A newer version (a newer checkout wrote it) is refused in
    one line, before anything is read by it; a manifest without a version (written before versions) loads and
    resumes, and the checkpoint written next records the version."""
    out = tmp_path / "run"
    shutil.copytree(at_step_1, out)
    manifest_file = checkpoint.latest_checkpoint(out) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION
    newer = checkpoint.FORMAT_VERSION + 1
    manifest_file.write_text(json.dumps(manifest | {"format_version": newer}, indent=2))
    capsys.readouterr()
    assert in_process(argv(world, out, max_steps=2, resume=True)) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: checkpoint {manifest_file.parent}: manifest.json has format_version {newer}, which this code does "
        f"not know (it reads 0 to {checkpoint.FORMAT_VERSION}): a newer version of this code wrote it; update this "
        "checkout to load it")
    with pytest.raises(UsageError, match=f"manifest.json has format_version {newer}, which this code does not know"):
        load_quietstar(out)
    del manifest["format_version"]
    manifest_file.write_text(json.dumps(manifest, indent=2))
    load_quietstar(out)
    assert in_process(argv(world, out, max_steps=2, resume=True)) == 0
    resumed = json.loads((checkpoint.latest_checkpoint(out) / "manifest.json").read_text())
    assert resumed["step"] == 2 and resumed["format_version"] == checkpoint.FORMAT_VERSION
