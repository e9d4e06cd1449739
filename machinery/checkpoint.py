"""A checkpoint's format in one place: which files a checkpoint folder holds, who writes and reads each, how they
are checked and versioned; and the run folder (--out_dir) that holds the checkpoints, one step or nothing, never a
file we did not write.

    out_dir/
      latest                  "checkpoint-000040": the one complete checkpoint, switched by an atomic rename
      checkpoint-000040/      the files below
      metrics.jsonl           one line per step (run.MetricsLog)
      thoughts.html           the thoughts page (thoughts_page.write_thoughts_page)
      .lock                   held (fcntl) by the live run, with its pid (RunLock)

A checkpoint folder, its files in the order run.save_checkpoint writes them (writer / reader):

  file                       holds                                   written by / read by
  adapter_model.safetensors  with --lora_rank only: the LoRA         lora.save_adapters / lora.load_adapters
  adapter_config.json          adapters and their config (peft's)      (train.build_model)
  model.safetensors          the base model's weights (LoRA's        hf_io.save_pretrained, called by save_quietstar /
  config.json                  merged in), its Hugging Face config,    hf_io.load_model_folder (load_pretrained,
  tokenizer.json               the tokenizer: transformers reads it    train.build_model)
  quietstar.safetensors      the markers and the mixing head         hf_io.save_quietstar / hf_io.load_quietstar_parts
  quietstar.json             their QuietStarConfig (LeverConfig)       (strict: both files, every tensor and shape);
                                                                       hf_io.load_quietstar reads the config
  train_config.json          the run's settings: {"train":           write_train_config / read_train_config (on
                               TrainConfig, "qstar": LeverConfig}      --resume, run.parse_args: what train.py's
                                                                       FIXED_ON_RESUME names may not change)
  train_state.pt             {"step", "optimizer": AdamW's full      write_train_state / read_train_state
                               state keyed by parameter name}          (run.resume_optimizer)
  manifest.json              format_version, step, and the size      write_checkpoint, last / read_manifest,
                               and SHA-256 of every other file         verify_manifest

Two owners, one table. The model files (Hugging Face, Quiet-STaR parts, adapters) are a model's format, not a run's:
save_pretrained and save_quietstar write them into any folder (a user's export, a conversion) and load_pretrained /
load_quietstar read any such folder, a checkpoint among them; so hf_io.py and lora.py write and read them, and a
checkpoint holds them unchanged. What only a checkpoint holds (the run's settings, the optimizer's state, the
manifest, `latest`) is written and read here.

Written: complete into a temporary folder, then renamed to checkpoint-NNNNNN, then `latest` is replaced (os.replace:
atomic), then older checkpoints go (write_checkpoint). A crash at any point leaves `latest` naming a complete
checkpoint (tests/test_crash.py kills runs with SIGKILL in each of these phases). A checkpoint that cannot fit in
the free space is refused before a byte is written; a write that fails for the storage's sake (disk full, quota,
read-only folder, I/O error) raises CheckpointWriteError and leaves `latest` where it was.

Checked: every file against the manifest's size and SHA-256 (verify_manifest), so a file altered after it was
written is refused by name: the whole checkpoint on --resume (run.lock_run_folder; train_config.json first, in
run.parse_args), the model's files (MODEL_PARTS) when a model is loaded from a run folder or a checkpoint folder
(gguf_import.resolve_model_dir: load_pretrained("out_dir") and load_quietstar("out_dir") follow `latest`).

Versioned: manifest.json's format_version is FORMAT_VERSION when written. It changes when a file is added, dropped
or read differently, so that a checkout never misreads a checkpoint that a newer one wrote: read_manifest refuses a
version it does not know, in one line. A manifest without format_version (written before it existed) is version 0:
the same files, and the readers still take that time's variants (a manifest with sizes only; the markers' old name
markers.scaled in quietstar.safetensors and train_state.pt).
"""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
from dataclasses import asdict
from pathlib import Path

from machinery.cli import UsageError

LATEST, MANIFEST, LOCK = "latest", "manifest.json", ".lock"
TRAIN_CONFIG, TRAIN_STATE = "train_config.json", "train_state.pt"
FORMAT_VERSION = 1          # written into manifest.json; 0 is a manifest from before the version was written
# The errors whose cause is the storage, not the code: no space, over quota, a file too large for the file system
# (FAT's 4 GiB), a failing disk, a read-only folder, a permission taken away (EPERM is Linux's EACCES for an
# immutable file or a sticky folder). Any other error in a checkpoint write is a bug and keeps its traceback.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM)
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)         # those after which the space needed and free are worth naming
# The estimate of a checkpoint's size (checkpoint_bytes) adds to the tensors' data and the text files:
PER_TENSOR = 1024          # a tensor's safetensors header entry (name, dtype, shape, offsets) or its torch.save
                           # zip record (local and central headers, 64-byte alignment, pickle): measured ~230 bytes
                           # a tensor for 50-character names; 1 KiB leaves room for names 4 times as long
RESERVE = 1 << 20          # the small JSON files (manifest, configs: a few kB) and each file's last partial block
MARGIN = 1.01              # file-system metadata for large files (ext4: ~0.01% in extent blocks): 1% is ample
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


def storage_errno(error: BaseException) -> int | None:
    """The errno (one of STORAGE_ERRNOS) that caused `error`, or None for an error the storage did not cause.
    Found in the error itself or in what it chains (__cause__, __context__): an OSError's errno; safetensors' and
    tokenizers' Rust "... (os error 28)"; torch.save's RuntimeError, written through a Python file, chains the
    file's OSError; failing those, the errno's text ("No space left on device")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error.errno
        text = str(error)
        for number in map(int, re.findall(r"os error (\d+)", text)):
            if number in STORAGE_ERRNOS:
                return number
        for number in STORAGE_ERRNOS:
            if os.strerror(number) in text:
                return number
        error = error.__cause__ or error.__context__
    return None


def tensors_in(obj):
    """Every tensor in nested dicts, lists and tuples (a state dict, an optimizer's state)."""
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif hasattr(obj, "element_size"):          # a tensor (torch is imported only to write or read train_state.pt)
        yield obj


def checkpoint_bytes(*states, text_bytes: int = 0) -> int:
    """An upper estimate of the bytes a checkpoint of these states (state dicts, optimizer state) takes on disk,
    plus text_bytes of text files (tokenizer.json): every tensor's data, PER_TENSOR beside it, RESERVE for the
    small files, times MARGIN. A tensor shared by two states (a tied embedding) counts twice: an overestimate."""
    tensors = [t for state in states for t in tensors_in(state)]
    data = sum(t.numel() * t.element_size() for t in tensors)
    return int((data + PER_TENSOR * len(tensors) + text_bytes + RESERVE) * MARGIN)


def human(n: int) -> str:
    """Bytes as df -h counts them (1 MiB = 2**20 bytes), two decimals, so that close sizes still differ."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def space(needed: int, out_dir: Path) -> str:
    return f"it needs about {human(needed)}, {human(shutil.disk_usage(out_dir).free)} free"


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
    return read_manifest(folder)["step"] if folder and (folder / MANIFEST).is_file() else None


def read_manifest(folder: Path) -> dict:
    """folder's manifest.json, refused in one line if its format_version is one this code does not know (a newer
    checkout wrote it). Without format_version: version 0, read as it is."""
    manifest = json.loads((folder / MANIFEST).read_text())
    version = manifest.get("format_version", 0)
    if not (isinstance(version, int) and 0 <= version <= FORMAT_VERSION):
        raise UsageError(f"checkpoint {folder}: {MANIFEST} has format_version {version!r}, which this code does not "
                         f"know (it reads 0 to {FORMAT_VERSION}): a newer version of this code wrote it; update this "
                         "checkout to load it")
    return manifest


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(out_dir: Path, step: int, write_files, needed: int) -> Path:
    """write_files(folder) writes a checkpoint's files into a fresh folder; this makes it the latest, atomically.
    needed: the bytes the checkpoint takes (checkpoint_bytes); with less free space in out_dir it is refused before
    anything is written. An error the storage caused on the way (storage_errno: ENOSPC from any writer, EROFS, a
    failed rename...) removes what this call wrote, leaves `latest` as it was and raises CheckpointWriteError;
    any other error is cleaned up the same way and raised as it is (a bug)."""
    out_dir = Path(out_dir)
    tmp = out_dir / f".tmp-checkpoint-{step:06d}-{os.getpid()}"
    final = out_dir / f"checkpoint-{step:06d}"
    pointer = out_dir / f".{LATEST}.tmp"
    failed = f"could not write the checkpoint of step {step} in {out_dir}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        if needed > shutil.disk_usage(out_dir).free:
            raise CheckpointWriteError(f"{failed} (not enough free space: {space(needed, out_dir)})")
        tmp.mkdir()
        write_files(tmp)
        crash_point("files")
        files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_of(f)} for f in sorted(tmp.iterdir())}
        manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
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
        shutil.rmtree(tmp, ignore_errors=True)      # first, so that the free space below is what a retry has
        pointer.unlink(missing_ok=True)
        if final.exists() and latest_checkpoint(out_dir) != final:
            shutil.rmtree(final, ignore_errors=True)
        number = storage_errno(e)
        if isinstance(e, CheckpointWriteError) or number is None:
            raise                                   # refused above, or not the storage: a bug, with its traceback
        reason = os.strerror(number) + (f": {e.filename}" if isinstance(e, OSError) and e.filename else "")
        if number in SPACE_ERRNOS:
            reason += f"; {space(needed, out_dir)}"
        raise CheckpointWriteError(f"{failed} ({reason})") from e
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
    names the file; a manifest of an unknown format_version is refused (read_manifest)."""
    expected = read_manifest(folder)
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


# ---- the files only a checkpoint holds: the run's settings and the optimizer's state ------------------------------

def write_train_config(folder: Path, cfg, qcfg):
    """train_config.json: the run's settings (train.TrainConfig, research.levers.LeverConfig), all of them, so that
    --resume continues the same run whatever the defaults have become since."""
    (folder / TRAIN_CONFIG).write_text(json.dumps({"train": asdict(cfg), "qstar": asdict(qcfg)}, indent=2))


def read_train_config(out_dir: Path) -> dict:
    """The saved settings of the run in out_dir, {"train": ..., "qstar": ...}, as written (the caller maps old
    option names: research.levers.renamed_settings). Only train_config.json is checked against the manifest: this
    is read before the run's lock is taken, to know the settings; the whole checkpoint is checked once locked."""
    saved_file = verify_checkpoint(out_dir, only=(TRAIN_CONFIG,)) / TRAIN_CONFIG
    if not saved_file.is_file():
        raise UsageError(f"--resume: {saved_file} is missing, so the run's settings are unknown; start a new "
                         "--out_dir")
    return json.loads(saved_file.read_text())


def write_train_state(folder: Path, step: int, optimizer_state: dict):
    """train_state.pt: the step and the optimizer's full state, keyed by parameter name (parallel.full_states), so
    that any number of ranks can resume it."""
    # torch is imported here and in read_train_state only: checking and locking a run folder need none
    import torch
    # through a Python file: a failed write then chains its OSError (errno) to torch's RuntimeError, which alone
    # says only "unexpected pos" (storage_errno)
    with open(folder / TRAIN_STATE, "wb") as f:
        torch.save({"step": step, "optimizer": optimizer_state}, f)


def read_train_state(folder: Path) -> tuple[int, dict]:
    """(step, the optimizer's state) from a checkpoint folder already verified; the markers' old parameter name
    (markers.scaled, before they were renamed markers.stored) is read under the new one."""
    import torch
    state = torch.load(folder / TRAIN_STATE, map_location="cpu", weights_only=True)
    optim = state["optimizer"]
    if "markers.scaled" in optim["state"]:
        optim["state"]["markers.stored"] = optim["state"].pop("markers.scaled")
        for group in optim["param_groups"]:
            group["params"] = ["markers.stored" if p == "markers.scaled" else p for p in group["params"]]
    return state["step"], optim


# ---- the run folder: checked before a run starts, locked while it runs ------------------------------------------

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
