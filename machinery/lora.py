"""LoRA (Hu et al. 2021) for the base model's linear layers, saved in peft's file layout.

Full fine-tuning of Mistral-7B with AdamW and fp32 master weights needs ~16 bytes per parameter (116 GB),
more than one 80 GB GPU. With LoRA the 7B weights stay frozen (in bf16: 14.5 GB) and only two small
matrices per adapted layer train: W x + (alpha / r) * B A x, B starting at zero so training starts from
the base model. Quiet-STaR's own parts (markers, mixing head) always train in full.

The adapters are written as adapter_model.safetensors + adapter_config.json with peft's key names, so
`peft.PeftModel.from_pretrained(transformers_model, out_dir)` can load them.
"""

import json
import math
from pathlib import Path

from torch import Tensor, nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Keeps `weight` visible for state dicts."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scaling = base, alpha / rank
        base.weight.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))      # as peft: A random, B zero
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).type_as(x) * self.scaling

    def merged_weight(self) -> Tensor:
        return self.base.weight + (self.lora_B.weight @ self.lora_A.weight * self.scaling).to(self.base.weight.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS) -> list[str]:
    """Freeze every weight of `model` and wrap the target linears; returns the wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named any of {targets} to put LoRA on")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain model, adapters merged in: what a checkpoint's model.safetensors holds."""
    state = {}
    lora = lora_modules(model)
    for key, value in model.state_dict().items():
        module_name = key.rsplit(".", 2)[0]
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if key.endswith(".base.weight") and module_name in lora:
            state[f"{module_name}.weight"] = lora[module_name].merged_weight().detach()
        else:
            state[key.replace(".base.", ".")] = value
    return state


def save_adapters(model: nn.Module, out_dir: Path, base_model: str, rank: int, alpha: float):
    """adapter_model.safetensors + adapter_config.json in peft's layout (keys under base_model.model.model)."""
    from safetensors.torch import save_file
    tensors = {}
    for name, module in lora_modules(model).items():
        prefix = f"base_model.model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = module.lora_A.weight.detach().float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = module.lora_B.weight.detach().float().contiguous()
    save_file(tensors, Path(out_dir) / "adapter_model.safetensors", metadata={"format": "pt"})
    targets = sorted({name.rsplit(".", 1)[-1] for name in lora_modules(model)})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True}
    (Path(out_dir) / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_adapters(model: nn.Module, out_dir: Path):
    """Copy saved adapter weights into a model that add_lora has already wrapped the same way."""
    from safetensors.torch import load_file
    tensors = load_file(Path(out_dir) / "adapter_model.safetensors")
    for name, module in lora_modules(model).items():
        prefix = f"base_model.model.model.{name}"
        module.lora_A.weight.data.copy_(tensors[f"{prefix}.lora_A.weight"])
        module.lora_B.weight.data.copy_(tensors[f"{prefix}.lora_B.weight"])
