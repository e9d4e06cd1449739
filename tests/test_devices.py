"""No tensor made on the default device. A tensor factory called without device= lands on the CPU, which breaks the
first CUDA user (generate.py's thinking step once did exactly that). No GPU is needed to catch the whole class:
run a training step and a thinking generation under a TorchFunctionMode that fails on any such call. (Setting
the default device to meta is not enough: an embedding lookup with meta indices into CPU weights returns
garbage silently.)"""

import pytest
import torch
from conftest import tiny_model, word_tokenizer
from torch.overrides import TorchFunctionMode

import fast as fast_twins
from generate import token_scores
from generate import generate_with_thoughts
from qstar import QuietStar, QuietStarConfig

FACTORIES = {torch.tensor, torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.rand,
             torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace}


class ExplicitDevicesOnly(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            raise AssertionError(f"torch.{func.__name__} called without device=")
        return func(*args, **kwargs)


def test_the_mode_catches_a_factory_call_without_a_device():
    with ExplicitDevicesOnly(), pytest.raises(AssertionError, match="torch.zeros called without device="):
        torch.zeros(2)
    with ExplicitDevicesOnly():
        assert torch.zeros(2, device="cpu").shape == (2,)


@pytest.mark.parametrize("fast,checkpointing", [(True, False), (False, True)])
def test_a_training_step_and_thinking_generation_name_their_devices(fast, checkpointing):
    tokenizer = word_tokenizer(36)
    model = tiny_model(37, window=4, eos_token_id=3)
    qs = QuietStar(model, QuietStarConfig(thought_len=3, n_true=3, activation_checkpointing=checkpointing), tokenizer)
    fast_twins.use(qs, fast)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.1)
    tokens = torch.randint(0, 37, (2, 9))
    with ExplicitDevicesOnly():
        out = qs(tokens)
        out["loss"].backward()
        token_scores(qs, tokens)
        generate_with_thoughts(qs, tokenizer, "w4 w5 w6", max_new_tokens=3, temperature=1.0, seed=0)
    assert torch.isfinite(out["loss"]) and qs.markers.stored.grad is not None
