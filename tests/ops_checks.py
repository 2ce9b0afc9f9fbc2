"""What every op test shares: tolerances, the lengths and chunk sizes, norm-relative comparison, and the run that
differentiates an op's outputs and final state for comparing a fast form with its slow twin."""

from __future__ import annotations

import torch

OUT_TOL = 1e-5
GRAD_TOL = 1e-4
GRAD_ATOL = 1e-6  # per element; gradients here are O(1), this only covers ones that cancel to ~0
LENGTHS = [(1, 16), (63, 16), (500, 64)]  # (T, chunk_size): chunk sizes that do not divide T
MODES = ("chunk", "recurrent", "quadratic")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error |a - b| / |b| (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close(a, b, tol, what, atol=0.0, terms=1):
    """|a - b| <= tol |b| + atol sqrt(max(numel, terms)) (norms); NaN anywhere fails.

    atol > 0 only for gradients, to cover the ones that are ~0 by cancellation, e.g. d o / d phi_q at
    T=1 (o = v phi_q.phi_k / (phi_q.phi_k + eps)) or d o / d window_factor when the window covers the
    whole stream (f cancels); `terms` = how many output entries are summed into the gradient tensor.
    """
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = float((a.detach().double() - b.detach().double()).norm())
    bound = tol * float(b.detach().double().norm()) + atol * max(b.numel(), terms) ** 0.5
    assert diff <= bound, f"{what}: relative error {rel_err(a, b):.2e} > {tol:.0e} (|a-b| = {diff:.2e})"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def left_pad_mask(T: int, pads) -> torch.Tensor:
    return torch.arange(T)[None, :] >= torch.tensor(pads)[:, None]  # [B, T]


def run_with_grads(call, leaves: dict, seed: int = 123):
    """Call op, project (o, float parts of the state) on fixed random weights, differentiate."""
    o, state = call(leaves)
    outs = [o] + [x for x in (state or ()) if x.is_floating_point()]
    g = gen(seed)
    loss = sum((x * torch.randn(x.shape, generator=g)).sum() for x in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return outs, state, dict(zip(leaves, grads))


def compare_runs(fast, ref, names):
    """Outputs, final state (bool parts exactly) and the gradients of `names` of two `run_with_grads` results."""
    (outs_f, state_f, grads_f), (outs_r, state_r, grads_r) = fast, ref
    assert_close(outs_f[0], outs_r[0], OUT_TOL, "output")
    for name, a, b in zip(state_r._fields, state_f, state_r):
        if a.dtype == torch.bool:
            assert torch.equal(a, b), f"state.{name} differs"
        else:
            assert_close(a, b, OUT_TOL, f"state.{name}")
    for name in names:
        assert grads_r[name] is not None, f"no gradient reaches {name}"
        assert torch.isfinite(grads_f[name]).all(), f"grad {name} not finite"
        assert_close(grads_f[name], grads_r[name], GRAD_TOL, f"grad {name}", GRAD_ATOL, outs_r[0].numel())
