"""The device side of `hisa.ops.pdl`: what a PDL-launched kernel runs before touching step data."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


# HISA_PDL_TRIGGER=0: no early trigger (the next kernel launches when this one's blocks have exited)
EARLY_TRIGGER = tl.constexpr(os.environ.get("HISA_PDL_TRIGGER", "1") != "0")


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has completed (its writes visible), then let the next
    kernel launch once every block of this one has got here. Without: nothing."""
    if PDL:
        gdc_wait()
        if EARLY_TRIGGER:
            gdc_launch_dependents()
