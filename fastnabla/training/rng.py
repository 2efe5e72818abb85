"""Keyed random streams: every random draw of a run is a function of ``(seed, purpose, counters)``.

The trainer never advances one long-lived generator. Each draw gets a fresh ``torch.Generator`` seeded
from a hash of its key, e.g. ``("sample", iteration, chunk)`` for the noise of one sampling chunk or
``("fl", iteration, trajectory, state)`` for the forward-looking smoothing noise at one state. So:

* a resumed run draws exactly what an uninterrupted one would (there is no generator state to lose);
* ``torchrun`` ranks that each sample their own share of a global batch draw the same trajectories a
  single process would, so the runs end with the same parameters;
* draws do not depend on the device (generators are CPU generators; tensors move afterwards).
"""

from __future__ import annotations

import hashlib
import struct

import torch

Tensor = torch.Tensor
_MASK_63 = (1 << 63) - 1


def derive_seed(seed: int, *key: int | str) -> int:
    """A 63-bit seed from ``seed`` and a key of ints/strings (stable across processes and runs)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", int(seed)))
    for part in key:
        if isinstance(part, str):
            h.update(b"s" + part.encode() + b"\0")
        else:
            h.update(b"i" + struct.pack("<q", int(part)))
    return int.from_bytes(h.digest(), "little") & _MASK_63


def keyed_generator(seed: int, *key: int | str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *key)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *key))


def keyed_normal(seed: int, keys: list[tuple[int | str, ...]], shape: tuple[int, ...]) -> Tensor:
    """Standard normal draws ``[len(keys), *shape]`` (fp32, CPU), row ``i`` from ``keyed_generator(seed, *keys[i])``."""
    out = torch.empty((len(keys), *shape))
    for i, key in enumerate(keys):
        out[i] = torch.randn(shape, generator=keyed_generator(seed, *key))
    return out
