"""The GPU code paths, run on the CPU: train.py's own bf16 autocast wrapper around real training steps (with and
without activation checkpointing, and LoRA on a bf16 frozen base), and the fast thought attention in bf16 against
the dense-mask reference in bf16. What cannot run here at all is listed in gpu.py."""

import pytest
import torch
from conftest import tiny_model, word_tokenizer

import fast as fast_twins
import train
from data import TokenWindows
from generate import thought_logits
from machinery import run as machinery_run
from machinery.hf_io import save_pretrained
from qstar import QuietStar, QuietStarConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpu-paths")
    save_pretrained(tiny_model(37, window=None, std=0.1, eos_token_id=3), word_tokenizer(36), path)
    return path


def one_step(tiny_dir, tmp_path, bf16: bool, **overrides) -> dict:
    """A thinking step exactly as train.main runs it, on the CPU, with the bf16 autocast switched on or off."""
    cfg, qcfg, _ = train.parse_args([f"--model={tiny_dir}", f"--out_dir={tmp_path}", "--seq_len=12",
                                     "--thought_len=3", "--n_true=2", "--batch_size=2", "--lr=1e-3",
                                     *[(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}"
                                       for k, v in overrides.items()]])
    device = torch.device("cpu")
    run = machinery_run.Run(cfg, qcfg, machinery_run.parallel.Ranks(), device, machinery_run.autocast_for(device, bf16), tmp_path, bf16)
    run.qs, run.tokenizer = train.build_model(cfg, qcfg, device, bf16, None)
    torch.nn.init.normal_(run.qs.mixing_head.net[-1].weight, std=0.1)       # as after some training
    texts = [" ".join(f"w{(7 * i + j) % 30 + 4}" for j in range(40)) for i in range(6)]
    run.train_data = run.think_data = TokenWindows(texts, run.tokenizer, cfg.seq_len, 3, cfg.seed)
    run.step_module = run.qs
    run.optimizer = torch.optim.AdamW(train.param_groups(run.qs, cfg))
    return train.train_step(run, step=0), run


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_a_bf16_autocast_step_is_finite_and_close_to_fp32(tiny_dir, tmp_path, checkpointing):
    """bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); through two layers, the LM head and a
    log-softmax the loss moves by about that much relative to its size: 2% of the loss is a generous bound."""
    fp32, _ = one_step(tiny_dir, tmp_path / "a", False, activation_checkpointing=checkpointing)
    bf16, run = one_step(tiny_dir, tmp_path / "b", True, activation_checkpointing=checkpointing)
    assert "nonfinite" not in bf16 and torch.isfinite(torch.tensor(bf16["loss"]))
    # Measured 4e-5 (loss) and 4e-6 (nll_base) relative: logits here are ~0.2. Thoughts may be drawn otherwise from
    # bf16 logits, but reach the losses only through mixing weights ~0.02 (< 1e-4 relative); NaN or inf fails.
    for key in ("loss", "nll_base", "nll_talk"):
        assert bf16[key] == pytest.approx(fp32[key], rel=0.02), key
    assert bf16["loss"] != fp32["loss"]                                    # autocast really was on (4e-5 apart)
    assert run.qs.markers.stored.dtype == torch.float32                    # fp32 masters


def test_lora_on_a_bf16_frozen_base(tiny_dir, tmp_path):
    row, run = one_step(tiny_dir, tmp_path, True, lora_rank=4, lora_alpha=8)
    assert "nonfinite" not in row and row["grad_norm"] > 0
    frozen = [p for p in run.qs.model.parameters() if not p.requires_grad]
    trained = [p for p in run.qs.model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)       # the base: bf16, frozen
    assert trained and all(p.dtype == torch.float32 for p in trained)     # the adapters, fp32
    lora_b = [m.lora_B.weight for m in run.qs.model.modules() if hasattr(m, "lora_B")]
    assert lora_b and all(b.abs().max() > 0 for b in lora_b)                # B starts at 0: the step moved it


def test_fast_thought_attention_in_bf16_matches_the_dense_reference_in_bf16():
    """Both bf16 paths against an fp64 reference: the fast path (summary key, own-key dot products) must be as
    accurate as the dense-mask path, within bf16's precision (twice the dense path's error, plus 1%)."""
    tokens, thoughts = torch.randint(0, 37, (2, 9)), torch.randint(0, 37, (2, 9, 3))
    logits = {}
    for name, dtype, fast in (("ref", torch.float64, False), ("dense", torch.bfloat16, False),
                              ("fast", torch.bfloat16, True)):
        qs = fast_twins.use(QuietStar(tiny_model(37, window=4), QuietStarConfig(thought_len=3), word_tokenizer(36)),
                            fast).to(dtype)
        with torch.no_grad():
            logits[name] = thought_logits(qs, tokens, thoughts).double()
    dense_error = (logits["dense"] - logits["ref"]).abs().max().item()
    fast_error = (logits["fast"] - logits["ref"]).abs().max().item()
    scale = logits["ref"].abs().max().item()
    # bf16 rounds at 2^-9 = 0.2%, ~6 roundings in series here: the dense path is off by 0.9-1.3% of the scale (4
    # seeds), inside 5%; the fast path used 0.3-0.45 of its own bound. A mask error is O(scale).
    assert 0 < dense_error < 0.05 * scale
    assert fast_error <= 2 * dense_error + 0.01 * scale, (fast_error, dense_error, scale)


def test_the_gpu_layout_of_the_summary_channel_gives_the_same_attention_on_the_cpu():
    """The summary channel pads the head dim to a multiple of 8 on a GPU (72 for E = 64) and of 2 on the CPU (66).
    The extra channels are zeros, so the GPU layout, run here, must give the CPU layout's values and gradients, and
    both the dense-mask reference's."""
    import torch.nn.functional as F

    from attention_mask import thought_mask
    from fast import padded_dim, thought_attention, with_summary_slot
    from model import attend
    assert padded_dim(64, torch.device("cpu")) == 66 and padded_dim(64, torch.device("cuda")) == 72
    M, H, K, T, E, step = 2, 6, 2, 7, 64, 3
    q = torch.randn(M, H, T, E, dtype=torch.float64, requires_grad=True)
    own_k = [torch.randn(M, K, T, E, dtype=torch.float64, requires_grad=True) for _ in range(step)]
    own_v = [torch.randn(M, K, T, E, dtype=torch.float64, requires_grad=True) for _ in range(step)]
    real_k, real_v = torch.randn(1, K, T, E, dtype=torch.float64), torch.randn(1, K, T, E, dtype=torch.float64)
    cpu_k, cpu_v = (with_summary_slot(x).repeat_interleave(M, dim=0) for x in (real_k, real_v))
    assert cpu_k.shape[-1] == 66
    results = []
    for width in (66, 72):
        k, v = (F.pad(x, (0, width - 66)) for x in (cpu_k, cpu_v))
        out = thought_attention(q, own_k, own_v, k, v, M, None)
        results.append((out, *torch.autograd.grad(out.square().sum(), [q, *own_k, *own_v])))
    for a, b in zip(*results):          # fp64: the extra channels add exact zeros; ~70-term sums of values ~10 in
        assert torch.allclose(a, b, atol=1e-12, rtol=0)          # another order are off by ~1e-14
    keys = torch.cat([real_k.expand(M, -1, -1, -1), *own_k], dim=2)
    values = torch.cat([real_v.expand(M, -1, -1, -1), *own_v], dim=2)
    dense = attend(q, keys, values, thought_mask(T, step))      # fp64 again: softmax over <= 10 keys, ~1e-15
    assert torch.allclose(results[0][0], dense, atol=1e-12, rtol=0)
