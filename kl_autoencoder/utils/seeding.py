"""Seeds derived from names and numbers: the same in every process, worker and Python version.

Python's ``hash()`` of a tuple is not specified across versions; sha256 is. A random draw that must
be reproducible (crops, posterior noise, sampled latents) takes its generator seed from
``derive_seed(purpose, seed, step, index, ...)``.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts``: sha256 of ``"kl-autoencoder:" + ":".join(parts)``."""
    text = "kl-autoencoder:" + ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
