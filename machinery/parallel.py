"""One GPU or many: train.py under torchrun, with PyTorch's own DistributedDataParallel or FSDP2.

    torchrun --nproc_per_node=4 train.py --parallel ddp      # every rank holds the whole model
    torchrun --nproc_per_node=8 train.py --parallel fsdp     # parameters, gradients and AdamW state sharded

One process is one rank on one device (cuda:LOCAL_RANK, or the CPU with gloo). Rank r of N takes rows
r*B .. r*B+B-1 of the global batch of N*B windows, and the uniform numbers that sample its thoughts are the same
rows of the global draw, so N ranks see exactly the windows and thoughts of one process with N times the batch.
Only rank 0 prints and writes files; every rank evaluates (FSDP needs all of them for its all-gathers).
Checkpoints are gathered into full state dicts (torch.distributed.checkpoint.state_dict) and written once, by
rank 0, in the usual layout, so a checkpoint of N ranks loads in one process and the other way round.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from machinery.cli import UsageError, resolve_device
from qstar import sample_from_logits

MODES = ("none", "ddp", "fsdp")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    mode: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or dist.is_initialized()


def setup(mode: str, device_name: str, timeout_s: int) -> tuple[Ranks, torch.device]:
    """The process group from torchrun's environment (nccl on GPU, gloo on CPU) and this rank's device."""
    if mode not in MODES:
        raise UsageError(f"--parallel must be one of {list(MODES)}, got {mode!r}")
    if "RANK" not in os.environ:                                   # a plain `python train.py`
        if mode != "none":
            raise UsageError(f"--parallel {mode} needs several processes: launch with "
                             f"torchrun --nproc_per_node=N train.py --parallel {mode} ...")
        return Ranks(), resolve_device(device_name)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Ranks(rank, world, mode if world > 1 else "none"), device


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(qs, ranks: Ranks, device, use_bf16: bool):
    """-> the module to call for training steps (qs itself, DDP(qs), or qs after fully_shard)."""
    if ranks.world > 1:
        qs.sample = partial(sample_block, rank=ranks.rank, world=ranks.world)   # thoughts as in the global batch
    if ranks.mode == "none":
        return qs
    qs.embed_ids = qs.model.embed                                  # reduced gradients must be dense (no sparse_embed)
    if ranks.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # find_unused_parameters: plain steps never touch the markers or the mixing head
        return DistributedDataParallel(qs, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16 else \
        MixedPrecisionPolicy()
    for layer in qs.model.layers:                                  # one all-gather per decoder layer
        fully_shard(layer, mp_policy=policy)
    fully_shard(qs, mp_policy=policy)                              # embeddings, head, markers, mixing head
    with torch.no_grad():                                          # FSDP initialises from the root's first
        qs(torch.zeros(1, 2, dtype=torch.long, device=device), think=False)    # forward, before evaluation;
    qs.reshard()                                                   # without a backward the root stays gathered
    return qs


def sample_block(logits, rank: int, world: int):
    """qstar.sample_from_logits for this rank's rows (R, .., V) of the global batch: the uniform numbers are drawn
    for all world * R rows, as one process would, and rows rank*R .. rank*R+R-1 are used."""
    R = logits.shape[0]
    u = torch.rand(world * R, *logits.shape[1:-1], 1, device=logits.device)[rank * R:(rank + 1) * R]
    return sample_from_logits(logits, u=u)


def marker_drift(qs) -> tuple[float, float]:
    """qs.markers.drift(), with the two marker rows gathered under FSDP (not the whole root)."""
    stored = qs.markers.stored
    return qs.markers.drift(stored.full_tensor() if hasattr(stored, "full_tensor") else None)


@contextmanager
def gathered(qs, ranks: Ranks):
    """FSDP keeps the root's parameters (embeddings, LM head, markers, mixing head) sharded outside its forward;
    evaluation and the thoughts page call other methods, so the root is unsharded around them."""
    if ranks.mode != "fsdp":
        yield
        return
    qs.unshard()
    try:
        yield
    finally:
        qs.reshard()


def mean(value: float, ranks: Ranks) -> float:
    if not ranks.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / ranks.world


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank if it is true on one (a stop request, a non-finite loss): ranks stop together."""
    if not ranks.active:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ranks: Ranks):
    if ranks.active:
        dist.barrier()


def full_states(qs, optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's full state dicts (parameter names as keys), on the CPU. Every rank must
    call this (it gathers); under FSDP only rank 0's copy is complete."""
    return get_model_state_dict(qs, options=FULL), get_optimizer_state_dict(qs, optimizer, options=FULL)


def load_optimizer(qs, optimizer, state: dict):
    """Load a full, name-keyed optimizer state (from any number of ranks) into this rank's optimizer. Parameters
    that the saved optimizer holds but never stepped (the markers and the mixing head after plain steps only) have
    no state to load: they start fresh, as they would have in the uninterrupted run (torch fills every parameter's
    state with one zero-gradient step first, which would shift their Adam bias correction by one step)."""
    never_stepped = {name for group in state["param_groups"] for name in group["params"]} - set(state["state"])
    set_optimizer_state_dict(qs, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, strict=not never_stepped))
    parameters = dict(qs.named_parameters())
    for name in never_stepped:
        optimizer.state.pop(parameters[name], None)
