"""int8 linear layers that keep a model's perplexity: int8 weights (per output channel) through PyTorch's int8 GEMM,
plus the two things that make its 8-bit activations safe on a language model.

1. **Per-token activation scale** (and 8-bit activations where the CPU has VNNI: `full_range_activations`).
   PyTorch's dynamically quantized linear picks one activation scale per call: over a whole block of tokens in a
   prefill or an evaluation, so one large token coarsens every other token's grid. Each row
   is divided by its own largest magnitude before the int8 product and the output multiplied back (the product is
   linear in the row, so this is exact up to rounding). At decode a call has one token and one scale already, so the
   division is skipped there.
2. **Outlier channels in float32** (the decomposition of LLM.int8(), Dettmers et al. 2022). A few input channels of
   some layers carry activations one or two orders of magnitude above the rest (SmolLM2's MLP down projections: about
   50 channels in each); quantized with the rest they wipe out the other channels' resolution. Those channels are found
   once, by running calibration tokens through the model (`find_outliers`), and multiplied in float32 against their
   own columns of the weight, which are zeroed in the int8 copy.

On a trained converted SmolLM2 (docs/RESULTS.md, issue 16), held-out perplexity rose by 169% with PyTorch's plain
dynamic int8 linear and by 0.55% with both (8-bit activations), for about 0.05x of the float32 step's time more.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn

OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s threshold on an input channel's largest |activation|


# torch.compile cannot take PyTorch's packed int8 weights as an argument of a custom op, so the op gets a key into
# this table (one entry per live Int8Linear, removed when it is garbage-collected; a copy gets its own); traced
# through the op, the int8 product is one opaque call in the compiled step instead of a graph break
_PACKED: dict[int, object] = {}
_KEYS = itertools.count()


@torch.library.custom_op("t2r::int8_linear", mutates_args=())
def _int8_linear_op(x: Tensor, key: int, out_features: int, reduce_range: bool) -> Tensor:
    return torch.ops.quantized.linear_dynamic(x, _PACKED[key], reduce_range)


@_int8_linear_op.register_fake
def _(x: Tensor, key: int, out_features: int, reduce_range: bool) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@functools.cache
def full_range_activations() -> bool:
    """Whether activations may use all 8 bits. PyTorch's dynamic linear keeps them to 7 (`reduce_range`) because
    x86's plain AVX2 int8 multiply-add sums pairs into 16 bits and can saturate; CPUs with VNNI (AVX512-VNNI or
    AVX-VNNI) sum into 32 bits, and there the 8th bit cuts the activations' rounding error in half (a 3.4x smaller
    mean squared error on SmolLM2's shapes). Read from /proc/cpuinfo; anywhere else, 7 bits."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _int8_linear(weight: Tensor) -> nn.Module:
    """PyTorch's dynamically quantized linear (per-output-channel int8 weights) holding `weight`, without a bias."""
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    dense.weight.data = weight
    dense.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore")
        return torch.ao.nn.quantized.dynamic.Linear.from_float(dense)


class Int8Linear(nn.Module):
    """`linear` with int8 weights: per-token activation scales and, for the input channels in `outliers`, a float32
    product. The bias stays float32 and is added after the product (asking the quantized module for its bias unpacks
    the whole weight at every call)."""

    def __init__(self, linear: nn.Linear, outliers: Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().clone()  # (out, in)
        outliers = (outliers if outliers is not None else torch.zeros(0)).to(torch.long)
        self.register_buffer("outliers", outliers)  # (k,) input channels kept in float32
        self.register_buffer("outlier_weight", weight[:, outliers].clone())  # (out, k)
        weight[:, outliers] = 0
        self.int8 = _int8_linear(weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.reduce_range = not full_range_activations()
        self._register()

    def _register(self) -> None:
        self.key = next(_KEYS)
        _PACKED[self.key] = self.int8._packed_params._packed_params
        weakref.finalize(self, _PACKED.pop, self.key, None)

    def __setstate__(self, state) -> None:  # copy.deepcopy / pickle: the copy's own weights under its own key
        super().__setstate__(state)
        self._register()

    def _int8(self, x: Tensor) -> Tensor:
        # the quantized module's own forward always reduces the range; the op it calls takes the choice
        if torch.compiler.is_compiling():
            return _int8_linear_op(x, self.key, self.out_features, self.reduce_range)
        return torch.ops.quantized.linear_dynamic(x, self.int8._packed_params._packed_params, self.reduce_range)

    def forward(self, x: Tensor) -> Tensor:  # x: (..., in)
        split = self.outliers.numel() > 0
        if split:
            kept = x[..., self.outliers]  # (..., k)
            x = x.index_fill(-1, self.outliers, 0.0)
        if x.numel() > x.shape[-1]:  # several tokens: one activation scale per token
            scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)  # (..., 1)
            y = self._int8(x / scale) * scale
        else:
            y = self._int8(x)
        if split:
            y = y + kept @ self.outlier_weight.T
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, outliers={self.outliers.numel()}"


@torch.no_grad()
def find_outliers(model: nn.Module, names: set[str], ids: Tensor,
                  threshold: float = OUTLIER_THRESHOLD) -> dict[str, Tensor]:
    """{name: the input channels of linear `name` whose largest |activation| over the tokens `ids` (B, T) exceeds
    `threshold`} for every name in `names`."""
    largest: dict[str, Tensor] = {}

    def record(name):
        def hook(module, inputs, output):
            a = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)  # (in,)
            largest[name] = torch.maximum(largest[name], a) if name in largest else a
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in sorted(names)]
    was_training = model.training
    try:
        model.eval()
        if getattr(model.config, "is_encoder_decoder", False):  # the encoder's and the decoder's linears both
            model(input_ids=ids, decoder_input_ids=ids)
        else:
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: torch.nonzero(a > threshold).flatten() for name, a in largest.items()}
