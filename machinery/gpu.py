"""The GPU-only switches, in one place, so that a reader sees what the CPU tests cannot execute. Two other GPU
paths live with their callers: torchrun's nccl backend and one cuda device per rank (machinery/parallel.py: setup),
and bf16 autocast (machinery/run.py: start_run), whose wrapper runs on the CPU too (tests/test_gpu_paths.py runs
training steps through it: bf16 matmuls, the bf16 frozen LoRA base).

Here, each used by one caller:
  matmul_tf32(device)     TF32 for fp32 matmuls on Ampere and newer (machinery/run.py: start_run)
  fused_adamw(device, m)  AdamW's fused CUDA kernel, except under FSDP's sharded parameters (train.py)
  peak_gib(device)        the CUDA caching allocator's peak (machinery/bench.py; on the CPU: the process's peak RSS)
  synchronize(device)     wait for queued kernels before reading a clock (machinery/bench.py)
Run once on an H200 (torch 2.11, 2026-11-26): a 3-step train.py run with bf16 autocast, fused AdamW, TF32 and
activation checkpointing, a LoRA run on the bf16 frozen base, and eval.py on cuda.
"""

import resource

import torch


def matmul_tf32(device: torch.device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


def fused_adamw(device: torch.device, parallel_mode: str) -> bool:
    return device.type == "cuda" and parallel_mode != "fsdp"


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # ru_maxrss is in KiB on Linux


def reset_peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
