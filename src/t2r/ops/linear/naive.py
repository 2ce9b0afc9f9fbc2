"""Slow twins of linear attention: the masked quadratic form straight from the definition, and the non-causal form.
Every fast path in chunk.py and recurrent.py is tested against these. Inputs are float32, laid out [B, T, H, dim];
they return unnormalised (num, den) plus the final state."""

from __future__ import annotations

import torch

from ..common import LinearState


def linear_attention_quadratic_terms(phi_q, phi_k, v, S0, z0):
    """Causal linear attention: num = tril(phi_q phi_k^T) v + phi_q S0, den = tril(...) 1 + phi_q z0."""
    A = torch.einsum("bthf,bshf->bhts", phi_q, phi_k).tril()  # [B, H, T, T]
    num = torch.einsum("bhts,bshd->bthd", A, v)  # [B, T, H, D]
    num = num + torch.einsum("bthf,bhfd->bthd", phi_q, S0)  # [B, T, H, D]
    den = A.sum(-1).transpose(1, 2) + torch.einsum("bthf,bhf->bth", phi_q, z0)  # [B, T, H]
    S = S0 + torch.einsum("bthf,bthd->bhfd", phi_k, v)  # [B, H, F, D]
    z = z0 + phi_k.sum(1)  # [B, H, F]
    return num, den, LinearState(S, z)


def linear_attention_noncausal_terms(phi_q, phi_k, v, S0, z0):
    """Non-causal linear attention: every query reads the state holding all keys."""
    S = S0 + torch.einsum("bthf,bthd->bhfd", phi_k, v)  # [B, H, F, D]
    z = z0 + phi_k.sum(1)  # [B, H, F]
    num = torch.einsum("bthf,bhfd->bthd", phi_q, S)  # [B, T, H, D]
    den = torch.einsum("bthf,bhf->bth", phi_q, z)  # [B, T, H]
    return num, den, LinearState(S, z)
