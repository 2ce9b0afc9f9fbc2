"""Randomness without side effects: library code runs its seeded work inside a fork of torch's RNG, so the caller's
random state is the same afterwards (it never calls `torch.manual_seed` on the caller's behalf)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int | None, device: str | torch.device | None = None) -> Iterator[None]:
    """Run the block with torch's CPU RNG (and, for a CUDA `device`, every CUDA device's: a training checkpoint saves
    and restores them all) seeded by `seed`; each is put back as it was afterwards. `seed=None`: a fork without
    seeding (the block's draws still leave the caller's state alone)."""
    device = torch.device(device or "cpu")
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
        yield
