"""LoRA adapters (peft) on a model's attention projections: the family's targets come from its adapter."""

from __future__ import annotations

import re
import warnings

from torch import nn

from .adapters import adapter_for
from .attention import is_conversion_parameter
from .errors import T2RError


def apply_lora(model: nn.Module, rank: int, modules: str = "", alpha: float | None = None) -> nn.Module:
    """Wrap `model` with peft LoRA adapters of rank `rank` (in place; returns the peft model). Only the adapters and
    the conversion's own parameters (feature maps, mixer parameters) train. `modules`: comma-separated module names
    (e.g. "q_proj,v_proj"); empty: the family's attention projections (`Adapter.lora_targets`)."""
    from peft import LoraConfig, get_peft_model  # heavy: imported when LoRA is used

    adapter = adapter_for(model)  # an unknown family is refused here, never given another family's targets
    names = [m.strip() for m in modules.split(",") if m.strip()]
    if names and not all(re.fullmatch(r"[A-Za-z_][\w.]*", n) for n in names):
        raise T2RError(f"--lora-modules takes comma-separated module names like q_proj,v_proj; got {modules!r}")
    targets = rf".*\.({'|'.join(re.escape(n) for n in names)})" if names else adapter.lora_targets
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=targets,
                        fan_in_fan_out=adapter.lora_fan_in_fan_out, bias="none")
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise T2RError(f"cannot add LoRA adapters to {targets!r}: {err}") from err
    for name, param in peft_model.named_parameters():
        if is_conversion_parameter(name):
            param.requires_grad_(True)
    return peft_model
