"""Overlap mode: while the device runs step N, the host post-processes step N-1 and prepares step N+1.

Synchronously, a decode step is schedule → run (one CUDA-graph replay) → sample (on the device,
then the step's one device-to-host read) → postprocess, and the device idles through the host
parts. In overlap mode (`EngineConfig.overlap`, `LLMEngine._step_overlap`) a pure decode step is
launched, its sampled tokens (greedy, or drawn with temperature / top-k / top-p / min-p:
`Sampler.sample_on_device`) stay on the device (`InFlightStep.tokens`) and go to a
pinned host buffer by an asynchronous copy; the host reads them (an event sync) only after the
next step is launched, whose decode rows take their input token from that device tensor
(`DecodeBuffers.fill`'s gather). So:

  * a request whose token is in flight holds `PENDING_TOKEN` as its last token (`Sequence.pending`):
    everything that counts tokens (scheduler, pages, positions, sparse hooks) works as before, and
    what reads token values (stop checks, detokenization, prefix-cache digests of full pages, L3
    writes) runs only once the step is resolved and the value put in its place;
  * a stop (EOS, stop token or string) is seen one step late: the request was scheduled in the next
    step too, whose token for it is dropped (never appended or output) and whose pages are freed
    with the request's. The next step's KV writes are ordered after it on the one stream, so a
    freed page is never written out of order. A request whose token in flight is its last by
    length (max_tokens, the context) is known in advance (`Sequence.last_pending`) and not scheduled;
  * a sampling failure (a row whose probabilities are not finite) is marked on the device, the row
    keeps a valid placeholder token for the step launched after it, and the request fails when the
    step is resolved;
  * a seeded request draws from its own generator, so its tokens are those of the synchronous
    engine; an unseeded one draws from the engine's shared generator, which a request stopped one
    step late has drawn from once more, so unseeded tokens may differ from a synchronous run's.

Any other step drains first (the step in flight is resolved, then the engine runs synchronously):
a prefill chunk or a request that can be admitted, a request with presence or frequency penalties
(they read the token in flight),
teacher forcing (score()), a schedule that might preempt or demote; a DSA model or an algorithm
that reads on the host never overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hisa.engine.sampler import DeviceDraw
from hisa.engine.scheduler import Scheduler
from hisa.engine.sequence import Sequence


@dataclass(eq=False)
class InFlightStep:
    """One launched decode step whose sampled tokens are not read back yet.

    draw: the sampler's result for `seqs` (one sampled row each, in row order), on the device;
    host: int64 [n] (pinned on CUDA), where its tokens are being copied (-1 in a row whose draw
    failed); done: the copy's event (None on the CPU, where the copy is synchronous)."""

    seqs: list[Sequence]
    draw: DeviceDraw
    host: torch.Tensor
    done: torch.cuda.Event | None
    rows: dict[Sequence, int] = field(default_factory=dict)  # seq -> its row (index in tokens)

    @property
    def tokens(self) -> torch.Tensor:
        """int64 [n] device: the sampled tokens, valid ids in every row (the next step's inputs)."""
        return self.draw.tokens

    def read(self) -> list[int | Exception]:
        """The sampled tokens on the host (an exception for a row whose draw failed): waits for this
        step's copy (the step's one sync)."""
        if self.done is not None:
            self.done.synchronize()
        return self.draw.resolve(self.host.tolist())


class TokenReadback:
    """Starts the asynchronous copy of a step's sampled tokens (left on the device by
    `Sampler.sample_on_device`) to the host.

    Two pinned buffers, used in turn: step N+1's copy is issued before step N's tokens are read.

    Example::

        readback = TokenReadback(max_rows=64, device=torch.device("cuda"))
        step = readback.start(sampler.sample_on_device(logits, seqs), seqs)   # no sync
        ...                                   # launch the next step
        tokens = step.read()                  # waits for this step's copy only
    """

    def __init__(self, *, max_rows: int, device: torch.device):
        pin = device.type == "cuda"
        self._host = [torch.zeros(max_rows, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if pin else None
        self._turn = 0

    def start(self, draw: DeviceDraw, seqs: list[Sequence]) -> InFlightStep:
        """draw: the tokens of the sampled rows of `seqs`, on the device → on their way to the host."""
        i, n = self._turn, len(seqs)
        self._turn ^= 1
        host = self._host[i][:n]
        host.copy_(draw.reported(), non_blocking=True)
        done = None
        if self._events is not None:
            done = self._events[i]
            done.record()
        return InFlightStep(seqs=seqs, draw=draw, host=host, done=done, rows={seq: r for r, seq in enumerate(seqs)})


def can_overlap(scheduler: Scheduler, *, l3: bool = False) -> bool:
    """Whether the next step may be launched while a step is in flight: no request can be admitted
    (none waits, or every request slot is taken and no L3 lookup has to start), every running request
    decodes an output token (greedy or sampled, a logit bias allowed) without penalties (they read the token in
    flight) or teacher forcing, and the pages of the next token
    fit in each pool (so the schedule can neither preempt nor demote)."""
    if not scheduler.running:
        return False
    if scheduler.waiting and (l3 or len(scheduler.running) < scheduler.max_num_seqs):
        return False
    need: dict[int, list] = {}  # id(pool) -> [pool, pages]
    for seq in scheduler.running:
        p = seq.params
        if seq.in_prefill or not seq.num_output or seq.needs_prefill or seq.forced_output is not None or p.penalizes:
            return False   # (a prompt's last token, computed alone, is not a decode: its step is synchronous)
        if not seq.last_pending:
            pool = scheduler.pool(seq)
            need.setdefault(id(pool), [pool, 0])[1] += scheduler.pages_needed(seq, 1)
    return all(pool.can_allocate(n) for pool, n in need.values())
