"""The one place seeds are derived: every random choice of a run is seeded from the run seed and its purpose.

Deriving every seed here (never ``hash()``, never the clock, never a shared global generator) is what
makes the same config + seed give the same bytes, in any process, in any order of calls. Two older
derivations keep their own arithmetic, so that published numbers stay reproducible; they live here too.
Standard library only: the torch-only core imports it.
"""

from __future__ import annotations

import random
import zlib
from typing import Any


def derived_seed(*parts: Any) -> int:
    """A 32-bit seed for one purpose: CRC-32 of the parts joined by "/" (e.g. ``(seed, "train", round, client)``)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def module_seed(seed: int, round: int, module: str) -> int:
    """Seed of the random rows a method hands a module's unfilled ranks (arithmetic kept from the first release)."""
    return (int(seed) * 1_000_003 + round * 7919 + zlib.crc32(module.encode())) % (2**63)


def labelled_random(label: str) -> random.Random:
    """A generator seeded by a text label (Python's string seeding: SHA-512 of the label); used by the built-in suite."""
    return random.Random(label)
