"""Attention transfer, the objective of stage 1: every converted layer's linear attention is trained to reproduce the
softmax attention of the original model, layer by layer.

One step costs about one forward pass of the teacher: the teacher (the student's own weights with softmax attention,
`t2r.adapters.original_model`, weights shared) runs without gradients up to the last converted layer, forward
pre-hooks capture each attention module's input hidden states and positions; then each converted layer computes
q, k, v with its frozen pretrained projections, the softmax attention output (the target, before o_proj) and its
linear attention output (the prediction) on them. Gradients flow only through the feature maps: there is no backward
pass through the network. Each layer's prediction is checkpointed (recomputed in the backward pass), so that memory
holds one layer's graph at a time, not all of them: what makes 2,048-token blocks fit.

Losses, averaged over the converted layers:
    mse  = mean((o_linear - o_softmax)^2) / var(o_softmax)      (normalised so that layers are comparable)
    ce   = Hedgehog's cross-entropy between the softmax attention rows and the linear attention's normalised rows
           (with a window: the hybrid rows), weight `attn_ce`; quadratic memory in the block length.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import ADAPTERS, adapter_for, original_model
from .adapters.base import Adapter, base_model_type
from .attention import LinearAttention, repeat_heads
from .errors import T2RError


class _Captured(Exception):
    """Raised by the last hook: the teacher's remaining layers and LM head are not needed."""


def share_weights(target: nn.Module, source: nn.Module) -> nn.Module:
    """Point every parameter of `target` at the parameter of the same name in `source` (frozen weights, one copy)."""
    params = dict(source.named_parameters(remove_duplicate=False))
    for prefix, module in target.named_modules():
        for name, param in list(module._parameters.items()):
            full = f"{prefix}.{name}" if prefix else name
            if param is not None and full in params:
                module._parameters[name] = params[full]
    return target


def follow_device(module: nn.Module, device: torch.device) -> None:
    """Move a teacher kept outside the trained module (so `accelerate` did not move it) to where the inputs are."""
    if any(t.device != device for t in itertools.chain(module.parameters(), module.buffers())):
        module.to(device)


def attention_rows(attn: LinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   adapter: Adapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax rows, linear attention rows) [B, H, T, T] of one layer on q [B, T, H, D], k, v [B, T, Hkv, D]: the
    layer's softmax attention weights (causal, within its window if it slides), and the weights its mixer gives the
    same keys, normalised to sum to 1. `rows @ v` is `attend`'s output (its quadratic twin). Only for mixers with a
    normaliser (`Mixer.normalised`): the delta rule's weights are signed and do not form rows."""
    if not attn.mixer.normalised:
        raise T2RError(f"the {attn.mixer.name} mixer has no attention rows (its weights are signed, without a "
                       "normaliser): train it with the output loss alone (attn_ce 0)")
    T, H = q.shape[1], q.shape[2]
    k, v = repeat_heads(k, H // k.shape[2]), repeat_heads(v, H // v.shape[2])  # (B, T, H, D)
    scores = attn.scale * torch.einsum("bthd,bshd->bhts", q.float(), k.float())  # (B, H, T, T)
    visible = (adapter or adapter_for_module(attn)).visible_keys(attn, T, q.device)  # (T, T)
    softmax_rows = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)  # (B, H, T, T)
    phi_q, phi_k = attn.feature_map(q, k)  # (B, T, H, F)
    weights = attn.mixer.weights(scores, phi_q, phi_k, v=v)  # (B, H, T, T)
    return softmax_rows, weights / (weights.sum(-1, keepdim=True) + attn.recipe.eps)  # (B, H, T, T) x 2


def adapter_for_module(attn: LinearAttention) -> Adapter:
    """The adapter of the family a converted attention module came from (it keeps its model's config)."""
    return ADAPTERS.get(base_model_type(attn.config))()


def attention_rows_ce(attn: LinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      adapter: Adapter | None = None) -> torch.Tensor:
    """Hedgehog's loss: cross-entropy of the linear attention's rows under the softmax rows, mean over queries."""
    target, rows = attention_rows(attn, q, k, v, adapter)
    return -(target * torch.log(rows.clamp_min(1e-12))).sum(-1).mean()


def output_error(attn: LinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
    """The layer's linear attention output against its softmax target: mean squared error / variance of the target."""
    pred = attn.attend(q, k, v, mode="chunk").float()  # (B, T, H, D)
    return (pred - target).pow(2).mean() / target.var().clamp_min(1e-8)


class AttentionTransfer(nn.Module):
    """forward(input_ids [B, T]) -> {"loss", "mse", "ce", "layer_errors" [layers]}: see the module docstring.

    Only the student is a submodule; the teacher shares its weights and is kept out of `parameters()`, so that
    optimizers and DDP see only the student."""

    def __init__(self, student: nn.Module, *, attn_ce: float = 0.0) -> None:
        super().__init__()

        self.student, self.attn_ce = student, attn_ce
        teacher = share_weights(original_model(student), student).eval()
        object.__setattr__(self, "teacher", teacher)  # not a submodule
        self.adapter = adapter = adapter_for(student)
        student_layers, teacher_layers = adapter.decoder_layers(student), adapter.decoder_layers(teacher)
        self.pairs = [(getattr(s, adapter.attention_attr), getattr(t, adapter.attention_attr))
                      for s, t in zip(student_layers, teacher_layers)
                      if isinstance(getattr(s, adapter.attention_attr), LinearAttention)]
        self.num_layers = len(student_layers)
        if not self.pairs:
            raise T2RError("the model has no linear attention layers: every layer kept softmax, nothing to distill")

    def train(self, mode: bool = True) -> "AttentionTransfer":
        super().train(mode)
        self.teacher.eval()
        return self

    def capture(self, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, object]]:
        """The teacher's forward (no grad) up to the last converted layer: each converted layer's attention input
        (hidden states [B, T, hidden], position embeddings or None)."""
        captured: dict[int, tuple] = {}
        last = len(self.pairs) - 1

        def hook_for(i):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                captured[i] = (hidden, kwargs.get("position_embeddings"))
                if i == last:
                    raise _Captured
            return hook

        follow_device(self.teacher, input_ids.device)
        handles = [t.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, (_, t) in enumerate(self.pairs)]
        try:
            with torch.no_grad():
                self.teacher(input_ids=input_ids, use_cache=False)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [captured[i] for i in range(len(self.pairs))]

    def forward(self, input_ids: torch.Tensor) -> dict:
        mses, ces = [], []
        for (attn, _), (hidden, positions) in zip(self.pairs, self.capture(input_ids)):
            with torch.no_grad():
                q, k, v = attn.qkv(hidden, positions)  # (B, T, H, D), (B, T, Hkv, D) x 2
                target = self.adapter.softmax_reference(attn, q, k, v).float()  # (B, T, H, D)
            if torch.is_grad_enabled():  # keep one layer's graph at a time: recomputed in the backward pass
                mses.append(checkpoint(output_error, attn, q, k, v, target, use_reentrant=False))
            else:
                mses.append(output_error(attn, q, k, v, target))
            if self.attn_ce:
                ces.append(attention_rows_ce(attn, q, k, v, self.adapter))
        mse = torch.stack(mses).mean()
        ce = torch.stack(ces).mean() if ces else mse.new_zeros(())
        errors = torch.zeros(self.num_layers, device=mse.device)
        errors[[attn.layer_idx for attn, _ in self.pairs]] = torch.stack(mses).detach()
        return {"loss": mse + self.attn_ce * ce, "mse": mse.detach(), "ce": ce.detach(), "layer_errors": errors}


@torch.no_grad()
def layer_errors(student: nn.Module, blocks: torch.Tensor, *, batch_size: int = 1) -> list[float]:
    """Each layer's attention-transfer error (normalised MSE of its linear vs softmax attention output, mean over
    `blocks` [N, T]); 0.0 for layers that kept softmax attention. Higher = harder to linearise."""
    transfer = AttentionTransfer(student).eval()
    total = torch.zeros(transfer.num_layers)
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(next(student.parameters()).device)
        total += transfer(batch)["layer_errors"].cpu() * batch.shape[0]
    return [float(x) for x in total / blocks.shape[0]]
