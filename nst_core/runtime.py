"""Process-wide settings that the entry points (`nst`, `nst-daemon`, the service process) apply
before torch loads. Importing `nst_core` applies none of them: a program that embeds the engine
keeps its own environment."""

from __future__ import annotations

import os


def prepare_process() -> None:
    """Set the OpenMP wait policy to PASSIVE unless the user set one.

    OpenMP threads that spin while waiting make every step several times slower whenever another
    process shares the CPU (measured: 41 s against 9.7 s for the same 20 steps on 2 busy cores).
    It only takes effect when called before torch loads.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
