"""Memory checks made before a command allocates: an estimate of what a request needs against the memory available
now, so that an impossible size (`--feature-dim 100000`, `bench --contexts 1000000`, `--batch-size 100000000`) is
refused in one line with the estimate, instead of ending in the allocator's out-of-memory error or in swap.

The estimates are floors (the tensors the request cannot do without, float32), so a refusal is never a false alarm;
a request that passes can still run short if other programs take the memory meanwhile."""

from __future__ import annotations

import os

import torch

from .errors import T2RError
from .units import fmt_bytes

FLOAT_BYTES = 4


class OutOfMemoryError(T2RError):
    """A request that cannot fit in the memory available; the message gives the estimate and what to change."""


def available_bytes() -> int:
    """Memory available to this process now: psutil's figure if it is installed, else the free physical pages."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def require_memory(needed: int, what: str, advice: str, *, device: str = "cpu") -> None:
    """Raise `OutOfMemoryError` if `needed` bytes exceed the memory available (the CPU's; a CUDA device's own free
    memory for device cuda*)."""
    if str(device).startswith("cuda"):
        free = int(torch.cuda.mem_get_info(torch.device(device))[0])
    else:
        free = available_bytes()
    if needed > free:
        raise OutOfMemoryError(f"{what} needs at least {fmt_bytes(needed)} but {fmt_bytes(free)} is available: "
                               f"{advice}")


def _geometry(config) -> tuple[int, int, int, int]:
    """(layers, hidden size, key/value heads, head dim) of an HF (text) config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, text.hidden_size, kv_heads, head_dim


def kv_cache_bytes(config, context: int, batch: int, element_bytes: int = FLOAT_BYTES) -> int:
    """A softmax model's KV cache at `context` tokens for `batch` rows: keys and values of every layer."""
    layers, _, kv_heads, head_dim = _geometry(config)
    return 2 * layers * kv_heads * head_dim * context * batch * element_bytes


def activation_bytes(config, tokens: int) -> int:
    """A training step's floor: the residual stream of every layer for `tokens` tokens, kept for the backward."""
    layers, hidden, _, _ = _geometry(config)
    return layers * hidden * tokens * FLOAT_BYTES
