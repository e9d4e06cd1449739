"""The run folder (--out_dir) and its checkpoints: one step or nothing, never a file we did not write.

    out_dir/
      latest                  "checkpoint-000040": the one complete checkpoint, switched by an atomic rename
      checkpoint-000040/      config.json, model.safetensors, tokenizer.json (Hugging Face layout),
                              quietstar.safetensors + quietstar.json, train_config.json, train_state.pt,
                              manifest.json (step, and the size and SHA-256 of every file; written last)
      metrics.jsonl           one line per step
      thoughts.html           the thoughts page
      .lock                   held (fcntl) by the live run, with its pid

A checkpoint is written complete into a temporary folder, then renamed to checkpoint-NNNNNN, then `latest` is
replaced (os.replace: atomic), then older checkpoints go. A crash at any point leaves `latest` naming a complete
checkpoint (tests/test_crash.py kills runs with SIGKILL in each of these phases). A write that fails (disk full,
read-only folder) raises CheckpointWriteError and leaves `latest` where it was. Loading or resuming a checkpoint
checks every file against the manifest's size and SHA-256, so a file altered after it was written is refused by
name. load_pretrained("out_dir") and load_quietstar("out_dir") follow `latest`.
"""

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

from machinery.cli import UsageError

LATEST, MANIFEST, LOCK = "latest", "manifest.json", ".lock"
FULL_DISK = 1 << 20        # bytes free under which a failed write is put down to a full disk
# What loading a model reads (not train_state.pt, the optimizer's state: twice the model's size)
MODEL_PARTS = ("config.json", "model.safetensors", "tokenizer.json", "quietstar.safetensors", "quietstar.json",
               "adapter_model.safetensors", "adapter_config.json")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, no permission...): nothing was saved, `latest` is unchanged."""


CRASH_COUNTS: dict[str, int] = {}


def crash_point(phase: str):
    """Fault injection for tests/test_crash.py: QUIETSTAR_CRASH_AT=phase (or phase:n, the n-th time here) kills
    this process with SIGKILL, as a power cut or the OOM killer would. Unset (always, outside that test): nothing."""
    wanted = os.environ.get("QUIETSTAR_CRASH_AT")
    if wanted and wanted.split(":")[0] == phase:
        CRASH_COUNTS[phase] = CRASH_COUNTS.get(phase, 0) + 1
        if CRASH_COUNTS[phase] == int(wanted.split(":")[1] if ":" in wanted else 1):
            os.kill(os.getpid(), signal.SIGKILL)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / LATEST
    return Path(out_dir) / pointer.read_text().strip() if pointer.is_file() else None


def checkpoint_step(out_dir: Path) -> int | None:
    folder = latest_checkpoint(out_dir)
    return json.loads((folder / MANIFEST).read_text())["step"] if folder and (folder / MANIFEST).is_file() else None


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(out_dir: Path, step: int, write_files) -> Path:
    """write_files(folder) writes a checkpoint's files into a fresh folder; this makes it the latest, atomically.
    Any OSError on the way (ENOSPC, EROFS, EACCES, a failed rename) removes what this call wrote, leaves `latest`
    as it was and raises CheckpointWriteError."""
    out_dir = Path(out_dir)
    tmp = out_dir / f".tmp-checkpoint-{step:06d}-{os.getpid()}"
    final = out_dir / f"checkpoint-{step:06d}"
    pointer = out_dir / f".{LATEST}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_files(tmp)
        crash_point("files")
        files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_of(f)} for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        crash_point("manifest")
        if final.exists():                          # left by a run that died before switching `latest`
            shutil.rmtree(final)
        os.rename(tmp, final)
        crash_point("renamed")
        pointer.write_text(final.name + "\n")
        _fsync(pointer)
        crash_point("pointer")
        os.replace(pointer, out_dir / LATEST)       # the switch: one atomic rename
    except Exception as e:
        try:
            free = shutil.disk_usage(out_dir).free
        except OSError:
            free = None
        if isinstance(e, OSError):
            reason = f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
        elif free is not None and free < FULL_DISK:    # torch.save and safetensors say "disk full" their own way
            reason = f"No space left on device: {free:,} bytes free ({type(e).__name__}: {str(e).splitlines()[0]})"
        else:
            raise                   # not a storage failure: a bug, with its traceback
        if final.exists() and latest_checkpoint(out_dir) != final:
            shutil.rmtree(final, ignore_errors=True)
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} in {out_dir} ({reason})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer.unlink(missing_ok=True)
    try:                                            # saved: the switch is done; make the rename durable
        _fsync(out_dir)
    except OSError:                                 # some file systems refuse a directory fsync; nothing is lost
        pass
    crash_point("switched")
    for old in out_dir.glob("checkpoint-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(out_dir: Path, only: tuple[str, ...] | None = None) -> Path:
    """The latest checkpoint's folder, after checking it against its manifest (verify_manifest)."""
    folder = latest_checkpoint(out_dir)
    if folder is None:
        raise UsageError(f"--resume but {out_dir} holds no checkpoint (no {LATEST} file)")
    if not (folder / MANIFEST).is_file():
        raise UsageError(f"{folder} has no {MANIFEST}: the checkpoint is incomplete; start a new --out_dir")
    return verify_manifest(folder, only)


def verify_manifest(folder: Path, only: tuple[str, ...] | None = None) -> Path:
    """Check that every file the manifest lists (or those of them named in `only`) is there with its size and
    SHA-256 (a manifest written before checksums existed holds sizes only). A damaged checkpoint is an error that
    names the file."""
    expected = json.loads((folder / MANIFEST).read_text())
    for name, want in expected["files"].items():
        if only is not None and name not in only:
            continue
        want = want if isinstance(want, dict) else {"bytes": want}
        f = folder / name
        size = f.stat().st_size if f.is_file() else None
        if size != want["bytes"]:
            raise UsageError(f"checkpoint {folder}: {name} is missing or has the wrong size "
                             f"({'missing' if size is None else size} != {want['bytes']} bytes): it was "
                             f"modified after step {expected['step']} was written")
        if "sha256" in want and sha256_of(f) != want["sha256"]:
            raise UsageError(f"checkpoint {folder}: {name} does not match its SHA-256 in {MANIFEST}: it was "
                             f"modified after step {expected['step']} was written")
    return folder


def prepare_out_dir(out_dir: Path, model: str, resume: bool):
    """Refuse an out_dir that is a file, the model's own folder, or a folder holding a model we did not write;
    refuse to start over a checkpoint, or to resume without one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out_dir {out_dir} is a file, not a folder")
    model_path = Path(model).expanduser()
    if model_path.exists() and out_dir.exists() and model_path.resolve() == out_dir.resolve() and not resume:
        raise UsageError(f"--out_dir {out_dir} is the --model folder itself; choose another --out_dir "
                         "(the checkpoint would overwrite the model)")
    step = checkpoint_step(out_dir)
    foreign = [f for f in MODEL_FILES if (out_dir / f).exists()]
    if foreign:
        raise UsageError(f"--out_dir {out_dir} holds a model that train.py did not write ({', '.join(foreign)}); "
                         "choose another --out_dir")
    if resume and step is None:
        raise UsageError(f"--resume but {out_dir} holds no checkpoint; drop --resume to start a new run")
    if not resume and step is not None:
        raise UsageError(f"--out_dir {out_dir} already holds a checkpoint at step {step}. Continue it with "
                         "--resume, or choose another --out_dir")


class RunLock:
    """An exclusive lock on out_dir for the life of the run: a second run on the same folder is refused with
    the live run's pid. fcntl locks die with their process, so a crashed run leaves no stale lock."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self.handle, self.created = None, not Path(out_dir).exists()

    def __enter__(self):
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise UsageError(f"--out_dir {self.path.parent} is in use by another run (pid {owner}); wait for it "
                             "to finish or choose another --out_dir") from None
        self.handle = handle
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            for stale in self.path.parent.glob(".tmp-checkpoint-*"):   # left by a run that was killed
                shutil.rmtree(stale, ignore_errors=True)
            (self.path.parent / f".{LATEST}.tmp").unlink(missing_ok=True)
        except BaseException:                   # a Ctrl-C right here: let go of the lock as __exit__ would
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self.handle:
            self.handle.close()
            self.path.unlink(missing_ok=True)
            if self.created and not any(self.path.parent.iterdir()):   # a run that failed before writing
                self.path.parent.rmdir()
        return False
