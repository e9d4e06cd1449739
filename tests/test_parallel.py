"""train.py under torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 give, step by step, the losses of one
process with the doubled batch; their checkpoints load in one process with the same logits; a run resumed under
torchrun equals the uninterrupted one, and a 2-rank checkpoint resumes in one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model, word_tokenizer

from machinery.hf_io import load_pretrained, save_pretrained

KEYS = ("loss", "nll_base", "nll_talk", "reinforce", "reward_mean", "grad_norm")
# fp32 throughout. What differs between 1 and 2 processes is only the order of floating-point sums: a global mean
# over 4 windows against the mean of two means over 2 (equal token counts: the data has no EOS, so every rank
# scores the same number of tokens), gloo's all-reduce of the gradients, matmuls over other batch shapes; and what
# Adam and the sampler make of that (see the marker drift below). Each key's bound (relative, absolute) comes from
# that, and lies well inside what half the batch per rank does (losses 1.1e-3 relative, grad_norm 3e-3 and more):
#   losses (~3.6): a reordered fp32 mean of n <= 176 terms is off by at most n * 6e-8 = 1e-5 relative; thoughts and
#     markers (a sample may flip, Adam may move a marker coordinate either way) enter only through the mixing
#     weight, < 1e-3 in these steps (measured: even a marker coordinate flipped by hand moves them < 2e-6);
#   reinforce, reward_mean (~1e-6, printed to 6 decimals): differences of two NLLs, each off by ~1e-6;
#   grad_norm (~0.15, printed to 4 decimals): its last digit may flip (1e-4), and it is first-order in the weights,
#     of which Adam may move a rare one either way by up to 2 * sum(lr) = 2.4e-3 (such a weight moves it <= 1.6e-4).
TOLERANCE = {"loss": (1e-4, 0), "nll_base": (1e-4, 0), "nll_talk": (1e-4, 0), "reinforce": (0, 1e-5),
             "reward_mean": (0, 1e-5), "grad_norm": (0, 5e-4)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("parallel")
    save_pretrained(tiny_model(37, window=None, std=0.1), word_tokenizer(36), w / "model")   # no EOS token
    docs = [" ".join(f"w{(11 * d + 7 * i) % 30 + 4}" for i in range(400)) for d in range(4)]
    (w / "docs.txt").write_text("\n\n".join(docs))
    return w


def train(world, out, n_procs: int, *extra) -> subprocess.CompletedProcess:
    args = [f"--model={world / 'model'}", f"--data={world / 'docs.txt'}", f"--out_dir={out}", "--device=cpu",
            "--seq_len=12", "--thought_len=2", "--n_true=2", "--max_steps=3", "--eval_interval=3",
            "--eval_windows=2", "--save_interval=3", "--lr=1e-3", "--threads=1", *extra]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}"] \
        if n_procs > 1 else [sys.executable]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([*launch, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"phase"' in line]


def assert_same_losses(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 2
    for x, y in zip(a, b):
        for key in KEYS:
            rel, abs_ = TOLERANCE[key]
            assert x[key] == pytest.approx(y[key], rel=rel, abs=abs_), (x["step"], key, x[key], y[key])
        # How far the markers moved (under FSDP gathered from their shards). Chaotic in a few coordinates: Adam's
        # first step is lr * g / (|g| + eps) whatever |g|, and the markers' first gradient comes from rewards that
        # are differences of nearly equal NLLs (its small coordinates differ by 1e-2 and more between the runs), so
        # a coordinate near 0 steps anywhere in [-lr, lr] * grad_scale. One such coordinate of 24 moves the drift by
        # at most ~3% (its whole move against all 24); 10% allows a few. Markers never updated have drift 0 (vs 0.3
        # to 0.7); markers trained on one rank's half of the batch are off by 14% and 26% at step 3.
        for key in ("marker_drift_start", "marker_drift_end"):
            assert x[key] == pytest.approx(y[key], rel=0.1), (x["step"], key, x[key], y[key])


def saved_drift(out) -> list[float]:
    """||marker - initial|| / ||initial|| of the markers in the run's latest checkpoint, start and end."""
    from safetensors.torch import load_file
    folder = out / (out / "latest").read_text().strip()
    parts = load_file(folder / "quietstar.safetensors")
    scale = json.loads((folder / "quietstar.json").read_text())["marker_grad_scale"]
    initial = parts["markers.initial"]
    return [((m - initial).norm() / initial.norm()).item() for m in parts["markers.stored"] * scale]


def logits(out):
    model, _ = load_pretrained(out)
    with torch.no_grad():
        return model(torch.arange(4, 30).view(2, 13))


@pytest.fixture(scope="module")
def single(world):
    train(world, world / "single", 1, "--batch_size=4")
    return world / "single"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_doubled_batch(world, single, mode):
    out = world / mode
    printed = train(world, out, 2, "--batch_size=2", f"--parallel={mode}").stdout
    assert printed.count("before training:") == 1                             # only rank 0 prints
    assert_same_losses(rows(out), rows(single))
    # the drift printed last is that of the markers saved, to its 6 decimals and a 24-term fp32 norm (< 2e-6): it
    # reads the whole of both rows (the other marker's drift is off by 7e-3 and more, never-updated ones by 0.7)
    last = rows(out)[-1]
    assert [last["marker_drift_start"], last["marker_drift_end"]] == pytest.approx(saved_drift(out), abs=5e-6)
    # the checkpoint, in one process (logits ~0.13): reordered sums leave ~1e-8. A weight that Adam moved the other
    # way (<= 2.4e-3; rare: every weight these logits use had an exact NLL gradient in step 1) moves them by at most
    # 0.8 x that; 1e-3 allows a mild one, and catches a checkpoint of the untrained weights (off by 5e-3).
    assert (logits(out) - logits(single)).abs().max().item() <= 1e-3
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000003", "latest", "metrics.jsonl", "thoughts.html"]


def test_resume_under_torchrun_equals_the_uninterrupted_run(world, single):
    whole, part = world / "ddp-whole", world / "ddp-part"
    train(world, whole, 2, "--batch_size=2", "--parallel=ddp", "--max_steps=4", "--save_interval=2")
    train(world, part, 2, "--batch_size=2", "--parallel=ddp", "--max_steps=2", "--save_interval=2")
    train(world, part, 2, f"--out_dir={part}", "--resume", "--max_steps=4")
    # the same processes, batch shapes and order of sums: exactly equal, bit for bit
    assert [{k: r[k] for k in KEYS} for r in rows(part)] == [{k: r[k] for k in KEYS} for r in rows(whole)]
    # and a checkpoint of 2 ranks continues in 1 process with the doubled batch
    alone = world / "ddp-then-one"
    train(world, alone, 2, "--batch_size=2", "--parallel=ddp", "--max_steps=2", "--save_interval=2")
    train(world, alone, 1, f"--out_dir={alone}", "--resume", "--max_steps=4", "--batch_size=4", "--parallel=none")
    assert_same_losses(rows(alone)[2:], rows(whole)[2:])
