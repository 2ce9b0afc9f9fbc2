"""A converted model's forward as a function of tensors: (input_ids, position_ids, *state) -> (logits, *state).

The recurrent state of every layer travels as plain tensors instead of inside a `RecurrentCache`, so the step has no
Python-side bookkeeping that changes from token to token. That is what `torch.compile` needs to compile a decode
step once (`compiled_decoder`), what an ONNX graph needs to carry the state in and out (`t2r.export_onnx`), and what
continuous batching needs to move a row's state in and out of a batch (`t2r.batching`).

    step = StateStep(model, state_layout(cache))
    logits, *state = step(ids, positions, *flatten_states(cache))   # logits: [B, V] of the last position
    fast = compiled_decoder(model)          # a drop-in model for t2r.decode: its one-token steps are compiled
    tokens, _ = decode(fast.model, ids, max_new_tokens=32)

Only models whose every layer is linear (no kept softmax layer: its KV cache grows) and whose adapter has a
`state_forward` (the llama family: llama, mistral, qwen2, qwen3) have such a step; others get a one-line reason.
"""

from __future__ import annotations

import logging
import shutil
import time
import types
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from .adapters import RecurrentLayer, adapter_for, cache_bytes
from .adapters.base import Adapter
from .decode import decode
from .errors import T2RError
from .generate import GenerationResult, new_cache, prepare_tokenizer
from .quantize import has_untraceable_linears

log = logging.getLogger(__name__)


class StateSlots:
    """The least a converted layer needs from a cache: `layers`, one `RecurrentLayer` per decoder layer."""

    def __init__(self, states: list) -> None:
        self.layers = []
        for state in states:
            slot = RecurrentLayer()
            slot.state = state
            self.layers.append(slot)


def state_layout(cache) -> list[tuple[type, int]]:
    """Per layer, (state NamedTuple class, number of tensors) of a cache that holds only recurrent states."""
    layout = []
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, RecurrentLayer):
            raise T2RError(f"layer {i} keeps softmax attention (a growing KV cache): the explicit-state step needs a "
                           "model whose every layer is linear")
        if layer.state is None:
            raise T2RError(f"layer {i} has no state yet: prefill at least one token first")
        layout.append((type(layer.state), len(layer.state)))
    return layout


def flatten_states(cache) -> list[torch.Tensor]:
    """Every layer's state tensors, in layer order (the layout says how to regroup them)."""
    return [t for layer in cache.layers for t in layer.state]


def group_states(flat, layout: list[tuple[type, int]]) -> list:
    """The inverse of `flatten_states`: one state NamedTuple per layer."""
    states, at = [], 0
    for cls, n in layout:
        states.append(cls(*flat[at:at + n]))
        at += n
    return states


def zero_states(model, batch: int) -> tuple[list[torch.Tensor], list[tuple[type, int]]]:
    """The state after no tokens, as flat tensors and their layout (a one-token forward shapes it, then zeroed).

    Only valid for states whose "nothing seen" value is all zeros (linear attention's S and z, gated and delta-rule
    states); a sliding-window state also holds its last W keys, which start as zeros too."""
    cache = new_cache(model)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=next(model.parameters()).device)
    with torch.inference_mode():  # inference tensors, like the states a decode loop passes (no recompilation)
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return [torch.zeros_like(t) for t in flatten_states(cache)], state_layout(cache)


class StateStep(nn.Module):
    """(input_ids [B, T], position_ids [B, T], *state) -> (logits [B, V] of the last position, *new state).

    T == 1 runs each layer's recurrent form, T > 1 its chunked form from the given state; no padding mask (every
    token given is real). Shares `model`'s weights."""

    def __init__(self, model: nn.Module, layout: list[tuple[type, int]]) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.adapter = adapter_for(model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *state: torch.Tensor):
        slots = StateSlots(group_states(state, self.layout))
        logits = self.adapter.state_forward(self.model, input_ids, position_ids, slots)  # (B, T, V)
        return (logits[:, -1], *flatten_states(slots))


class StepModel(nn.Module):
    """A converted model for `t2r.decode`: one-token forwards whose cache holds only recurrent states go through
    `step` (a compiled `StateStep`); every other call (prefill, padding masks) goes to the model itself. Attributes
    it does not have (config, generation_config, ...) are the model's, so caches and adapters treat it as the model."""

    def __init__(self, model: nn.Module, step_for) -> None:
        super().__init__()
        self.inner = model
        self.step_for = step_for  # layout -> callable
        self.steps = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                logits_to_keep=0, **kwargs):
        layers = getattr(cache, "layers", ())
        if input_ids.shape[1] != 1 or position_ids is None or not layers or not all(
                isinstance(layer, RecurrentLayer) and layer.state is not None for layer in layers):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        layout = state_layout(cache)
        key = tuple((cls.__name__, n) for cls, n in layout)
        if key not in self.steps:
            self.steps[key] = self.step_for(layout)
        logits, *state = self.steps[key](input_ids, position_ids, *flatten_states(cache))
        for layer, new in zip(layers, group_states(state, layout)):
            layer.advance(new, 1)
        return SimpleNamespace(logits=logits[:, None])  # (B, 1, V)


@dataclass
class CompiledDecoder:
    model: nn.Module         # a StepModel whose steps are compiled, or the model itself (fallback)
    compiled: bool
    reason: str              # why compilation was not used ("" when it was)
    compile_seconds: float   # time of the first (compiling) step


def has_state_step(model: nn.Module) -> bool:
    """Whether `model`'s family has an explicit-state step (its adapter implements `state_forward`)."""
    return type(adapter_for(model)).state_forward is not Adapter.state_forward


def compile_unavailable(model: nn.Module) -> str:
    """Why `torch.compile` of the step cannot be used here ("" if nothing is known to stop it)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    device = next(model.parameters()).device
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "inductor's CPU backend needs a C++ compiler (g++ or clang++) on PATH"
    if not has_state_step(model):
        return f"the {type(adapter_for(model)).__name__} family has no explicit-state decode step (llama, mistral, qwen2, qwen3 do)"
    if has_untraceable_linears(model):
        return ("its linears are fp16-quantized (--quantize fp16), which torch.compile cannot trace (a graph break in "
                "every layer, slower than eager fp16 here); --quantize int8 compiles")
    kept = (getattr(model, "config", None) and model.config.t2r.get("keep_softmax_layers")) or ()
    if kept:
        return f"layers {list(kept)} keep softmax attention (a growing KV cache), which the fixed-state step cannot hold"
    return ""


def own_code(step: StateStep):
    """`step.forward` as a function with a code object of its own. Dynamo keeps its compiled graphs, and their
    guards, per code object: without this, every model's step shares one cache, and a new model's first call is checked
    against guards that read modules it does not have (an int8 layer's buffers: a KeyError instead of a miss)."""
    forward = StateStep.forward
    fresh = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__, forward.__defaults__,
                               forward.__closure__)
    return types.MethodType(fresh, step)


def compiled_decoder(model: nn.Module, *, mode: str | None = None) -> CompiledDecoder:
    """The model with its one-token decode step compiled by `torch.compile` (inductor), checked by compiling and
    running one batch-1 step; on any failure, the model itself and the reason (logged), so a caller always decodes."""
    reason = compile_unavailable(model)
    if reason:
        log.warning("--compile: not compiling (%s); decoding eagerly", reason)
        return CompiledDecoder(model, False, reason, 0.0)

    def step_for(layout):
        return torch.compile(own_code(StateStep(model, layout)), mode=mode, dynamic=False)

    fast = StepModel(model, step_for)
    start = time.perf_counter()
    try:
        state, layout = zero_states(model, 1)
        with torch.inference_mode():
            fast.steps[tuple((cls.__name__, n) for cls, n in layout)] = step = step_for(layout)
            ids = torch.zeros(1, 1, dtype=torch.long, device=state[0].device)
            step(ids, ids, *state)
    except Exception as err:  # noqa: BLE001  (a compiler failure of any kind: fall back, say why)
        reason = f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        log.warning("--compile: %s; decoding eagerly", reason)
        return CompiledDecoder(model, False, reason, time.perf_counter() - start)
    return CompiledDecoder(fast, True, "", time.perf_counter() - start)


def generate_lean(model, tokenizer, prompt: str, *, max_new_tokens: int, sampling):
    """`t2r.generate.generate` for one prompt through the lean loop `t2r.decode` (which a `StepModel` plugs into),
    stopping at the tokenizer's EOS."""
    prepare_tokenizer(tokenizer)
    enc = tokenizer([prompt], return_tensors="pt")
    cache = new_cache(model)
    start = time.perf_counter()
    new, cache = decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                        sampling=sampling, eos_token_id=tokenizer.eos_token_id, cache=cache)
    seconds = time.perf_counter() - start
    return GenerationResult(texts=tokenizer.batch_decode(new, skip_special_tokens=True),
                            prompt_tokens=int(enc["input_ids"].shape[1]), new_tokens=int(new.shape[1]),
                            seconds=seconds, tokens_per_s=new.numel() / max(seconds, 1e-9),
                            state_bytes=cache_bytes(cache))
