"""Programmatic dependent launch (PDL) for the decode step's Triton kernels (Hopper and later).

A decode step is a chain of ~20 short kernels per layer; each pays a ramp (its blocks scheduled,
their first loads in flight) while the SMs drain the previous kernel's last blocks. With PDL a
kernel may be launched before the previous one has finished: its blocks start, read what no
earlier kernel of the step writes (a projection's weights), then wait (`griddepcontrol.wait`) until
the previous kernel has completed and its writes are visible, and only then read or write anything
else. Each PDL kernel also lets the next one launch as soon as all its own blocks are running.

Rules every kernel launched with `launch_pdl=True` follows (`triton_pdl.pdl_enter`): no store and no
load of step data before the wait. A kernel launched without PDL (torch's own, a copy) waits for
everything before it as usual, so mixing is safe.

`enabled(t, kind)`: launch kernels on t's device with PDL (CUDA, compute capability >= 9, and
HISA_PDL naming the kernel's kind). Off by default: on an H200 it made the 32K x 8 quest step
slower, 6.16 vs 5.91 ms (A/B in one session, 07989a3); HISA_PDL=1 turns it on for every kind, and a
comma-separated list of kinds (`KINDS`: "linear" for the projections and the norm and activation
kernels, "selection" for page scoring, top-k and the table layout, "attention" for paged decode,
"kv_write" for the new token's write and the representations' update) turns it on for those only,
for experiments. The CPU interpreter never uses it.
"""

from __future__ import annotations

import functools
import os

import torch

KINDS = ("linear", "selection", "attention", "kv_write")


def _kinds(value: str) -> frozenset[str]:
    if value in ("", "0"):
        return frozenset()
    if value == "1":
        return frozenset(KINDS)
    kinds = frozenset(v.strip() for v in value.split(",") if v.strip())
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"HISA_PDL: unknown kernel kinds {sorted(unknown)}; use 0, 1 or a comma-separated list of "
                         f"{list(KINDS)}")
    return kinds


ENABLED = _kinds(os.environ.get("HISA_PDL", "0"))


def enabled(t: torch.Tensor, kind: str) -> bool:
    assert kind in KINDS, kind
    return kind in ENABLED and t.is_cuda and _capability(t.device.index) >= 9


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def launch_kwargs(t: torch.Tensor, kind: str) -> dict:
    """Keyword arguments of a launch of a kernel that takes `PDL: tl.constexpr` (and starts with
    `triton_pdl.pdl_enter(PDL)`): PDL on for t's device where `enabled`, else nothing."""
    return {"PDL": True, "launch_pdl": True} if enabled(t, kind) else {}
