"""The recurrent state cache: plugs the fixed-size linear-attention state into HF's `Cache` so that `generate()`,
beam search and batch selection work unchanged.

Linear layers hold a `LinearState` (S, z) or `WindowState` (S, z + the last W tokens); layers kept as softmax hold an
ordinary growing `DynamicLayer`, or, where their own attention slides over W tokens (Gemma 3's local layers, Mistral),
a `FixedWindowLayer` whose W - 1 slots are allocated at the first token. Nothing here depends on the number of tokens
seen except that counter itself and the growing KV cache of a kept full-attention layer.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import T2RError


def _map_state(state, fn):
    """Apply `fn` to every tensor of a state NamedTuple (all have the batch as dim 0)."""
    return None if state is None else type(state)(*(fn(t) for t in state))


class RecurrentLayer(CacheLayerMixin):
    """One linear-attention layer's state. Counts as an attention layer for HF's mask sizing."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.state = None  # LinearState | WindowState | None
        self.seen_tokens = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # nothing to allocate ahead of time
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise T2RError(
            "a linear-attention layer keeps a recurrent state, not keys and values: "
            "this attention module was not converted by t2r, or the cache was shared with another model"
        )

    def advance(self, state, num_tokens: int) -> None:
        """Store the state after `num_tokens` more tokens."""
        self.state = state
        self.seen_tokens += num_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise T2RError(
                "a recurrent state cannot be rewound (assisted / speculative decoding needs a KV cache); "
                "generate without an assistant model"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = _map_state(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = _map_state(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = _map_state(self.state, lambda t: t[indices])

    def offload(self) -> None:
        self.state = _map_state(self.state, lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:  # states are small; they stay where the model runs
        pass

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state[0].shape[0]

    def nbytes(self) -> int:
        return 0 if self.state is None else sum(t.numel() * t.element_size() for t in self.state)

    def __repr__(self) -> str:
        return f"RecurrentLayer(seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"


class FixedWindowLayer(DynamicSlidingWindowLayer):
    """A kept sliding-window softmax layer's keys and values in W - 1 slots allocated at its first token, so that the
    whole cache of a model converted only in its global layers has one size from the first token on.

    `keys` / `values` (B, Hkv, W - 1, D) hold the last `filled` tokens right-aligned (the slots before them are zeros
    that no query reads); `update` returns exactly what HF's `DynamicSlidingWindowLayer` returns (the cached tokens,
    then the new ones), so attention and its mask are unchanged. Beam reordering and batch selection are HF's own
    (they index dim 0 of keys and values)."""

    def __init__(self, sliding_window: int, **kwargs) -> None:
        super().__init__(sliding_window)
        self.filled = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        slots = self.sliding_window - 1
        self.keys = key_states.new_zeros(batch, heads, slots, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, slots, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.keys.shape[-2]
        full_keys = torch.cat([self.keys[:, :, slots - self.filled:], key_states], dim=-2)
        full_values = torch.cat([self.values[:, :, slots - self.filled:], value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        self.filled = min(slots, full_keys.shape[-2])
        if self.filled:
            self.keys[:, :, slots - self.filled:] = full_keys[:, :, -self.filled:]
            self.values[:, :, slots - self.filled:] = full_values[:, :, -self.filled:]
        return full_keys, full_values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise T2RError("a sliding-window cache of fixed size cannot be rewound (assisted / speculative decoding "
                           "needs a growing KV cache); generate without an assistant model")

    def reset(self) -> None:
        super().reset()
        self.filled = 0

    def fill_to(self, length: int) -> None:
        """Pretend `length` tokens were read (the speed benchmark's stand-in for a long prefill)."""
        self.cumulative_length, self.filled = length, min(length, self.keys.shape[-2])


class RecurrentCache(Cache):
    """A cache for a converted model: `RecurrentLayer` for linear layers; for kept softmax layers a `DynamicLayer`, or
    a `FixedWindowLayer` where `windows[i]` (the adapter's `layer_windows`) says that layer slides."""

    def __init__(self, num_layers: int, softmax_layers: tuple[int, ...] = (),
                 windows: list[int | None] | None = None) -> None:
        windows = windows or [None] * num_layers
        layers = [RecurrentLayer() if i not in softmax_layers
                  else FixedWindowLayer(windows[i]) if windows[i] else DynamicLayer()
                  for i in range(num_layers)]
        super().__init__(layers=layers)


def recurrent_slot(cache: Cache | None, layer_idx: int) -> RecurrentLayer | None:
    """The state slot of layer `layer_idx`, turning a plain HF cache layer into a recurrent one on first use.

    HF builds a `DynamicCache` on its own when a forward call asks for `use_cache` without passing a cache; its layer
    is still empty then, so replacing it is safe."""
    if cache is None:
        return None
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    slot = layers[layer_idx]
    if isinstance(slot, RecurrentLayer):
        return slot
    if slot.get_seq_length() > 0:
        raise T2RError(f"layer {layer_idx}'s cache already holds softmax keys/values: pass a fresh cache")
    layers[layer_idx] = slot = RecurrentLayer()
    return slot


def cache_bytes(cache: Cache | None) -> int:
    """Bytes held by any HF cache: recurrent states plus keys/values of softmax layers."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        if isinstance(layer, RecurrentLayer):
            total += layer.nbytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def extend_kv_cache(cache: Cache, length: int) -> Cache:
    """A copy of a batch-1 `cache` made to hold `length` tokens: softmax keys/values tiled along the sequence (a sliding
    layer keeps at most its last W - 1, as after a real prefill), recurrent states kept as they are with their token
    count set to `length` (the cost of a decode step does not depend on what the cached values are). The speed
    benchmark uses it where a real prefill of `length` tokens would take too long."""
    with torch.inference_mode():
        out = copy.deepcopy(cache)
        for layer in out.layers:
            if isinstance(layer, RecurrentLayer):
                layer.seen_tokens = length
            elif isinstance(layer, FixedWindowLayer):
                if layer.is_initialized:
                    layer.fill_to(length)
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                keep = min(length, layer.sliding_window - 1) if isinstance(layer, DynamicSlidingWindowLayer) else length
                reps = -(-keep // layer.keys.shape[-2])
                layer.keys = layer.keys.repeat(1, 1, reps, 1)[:, :, :keep].contiguous()  # (B, Hkv, L, D)
                layer.values = layer.values.repeat(1, 1, reps, 1)[:, :, :keep].contiguous()  # (B, Hkv, L, D)
                if isinstance(layer, DynamicSlidingWindowLayer):
                    layer.cumulative_length = length
    return out
