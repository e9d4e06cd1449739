"""A long training run on a small model, watched from outside: resident memory and step time must stay flat.

    python -m machinery.long_run                   # 600 steps, about 2 minutes on 2 CPU cores -> results/long_run.json

train.py runs as a child process on a small random Mistral (4 layers, dim 64, a 300-word vocabulary) over
generated text, thinking at every step and saving and evaluating every 50 steps as a real run would. Every 0.2 s this
script reads the child's resident memory (/proc/PID/status, VmRSS) and the last step in metrics.jsonl, so
nothing inside the run changes to be measured. Step time comes from metrics.jsonl's tokens_per_s.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return -1
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=-1)


def small_model_and_text(folder: Path):
    """A random 4-layer Mistral with a word-level tokenizer (w0..w299 and "---") and 40 documents of its words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from machinery.hf_io import save_pretrained
    from model import Mistral, MistralConfig
    vocab = {f"w{i}": i for i in range(300)} | {"---": 300}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(vocab), dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                        ffn_dim=128, sliding_window=None, rope_theta=10000.0)
    save_pretrained(Mistral(cfg), tokenizer, folder / "model")
    docs = [" ".join(f"w{(37 * d + 11 * i + i * i // 7) % 290 + 5}" for i in range(600)) for d in range(40)]
    (folder / "docs.txt").write_text("\n\n".join(docs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=str(ROOT / "results" / "long_run.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small_model_and_text(tmp)
        run = tmp / "run"
        cmd = [sys.executable, str(ROOT / "train.py"), f"--model={tmp / 'model'}", f"--data={tmp / 'docs.txt'}",
               f"--out_dir={run}",
               f"--max_steps={args.steps}", "--seq_len=64", "--batch_size=2", "--thought_len=4", "--n_true=4",
               "--eval_interval=50", "--save_interval=50", "--eval_windows=4", "--lr=1e-4", "--threads=2"]
        started = time.time()
        log = open(tmp / "train.log", "w+")            # a file, not a pipe: a full pipe would block the run
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "TQDM_DISABLE": "1"})
        samples = []                                   # (seconds, step, rss MiB)
        while child.poll() is None:
            rss = rss_mib(child.pid)
            if rss is not None:
                samples.append((round(time.time() - started, 2), last_step(run / "metrics.jsonl"), round(rss, 1)))
            time.sleep(0.2)
        log.seek(0)
        output = log.read()
        if child.returncode != 0:
            print(output[-3000:])
            return child.returncode
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    tokens = 2 * 64

    def rss_at(step):                                   # the largest RSS seen while that step was the last logged
        seen = [m for _, s, m in samples if s == step]
        return max(seen) if seen else None

    def step_seconds(first, last):                      # median step time over steps first..last (no eval steps)
        times = [tokens / r["tokens_per_s"] for r in steps if first <= r["step"] <= last and "eval_nll_none" not in r]
        return round(statistics.median(times), 4)

    end = args.steps - 1                                # the last step's RSS (after it: final eval and summary)
    result = {
        "command": "python -m machinery.long_run" + (f" --steps {args.steps}" if args.steps != 600 else ""),
        "train_command": " ".join(cmd[1:]).replace(str(ROOT) + "/", "").replace(tmp.as_posix(), "TMP"),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "steps": args.steps, "wall_s": round(time.time() - started, 1),
        "rss_mib": {"step_20": rss_at(20), "step_100": rss_at(100), "end (step %d)" % end: rss_at(end),
                    "peak": max(m for _, _, m in samples)},
        "step_s_median": {"steps_11_40": step_seconds(11, 40), f"steps_{args.steps - 29}_{args.steps}":
                          step_seconds(args.steps - 29, args.steps)},
        "samples_every_50_steps": [(t, s, m) for t, s, m in samples if s % 50 == 0][::5],
    }
    result["rss_end_over_step_20"] = round(rss_at(end) / rss_at(20), 4)
    times = list(result["step_s_median"].values())
    result["step_time_end_over_start"] = round(times[1] / times[0], 4)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples_every_50_steps"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
