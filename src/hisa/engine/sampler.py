"""Token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from hisa.engine.sequence import Sequence


class Sampler:
    """Picks the next token of each row of `logits`.

    Greedy rows take the argmax. Sampled rows apply temperature, then top-k, then top-p (nucleus)
    and draw from what is left. A request with a seed draws from its own generator, so its output
    does not depend on what else shares the batch.
    """

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seq_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._seq_generators.pop(request_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        gen = self._seq_generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            self._seq_generators[seq.request_id] = gen
        return gen

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits: fp32 [B, V] (one row per sequence in `seqs`) → B token ids."""
        out = logits.argmax(dim=-1)  # [B]
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        for i in sampled:  # per-row: each may have its own generator and filters
            p = seqs[i].params
            row = logits[i] / p.temperature
            if p.top_k and p.top_k < row.shape[-1]:
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(row, descending=True)
                probs = sorted_logits.softmax(-1)
                # drop a token when the mass before it already reaches top_p (the first one always stays)
                drop = probs.cumsum(-1) - probs >= p.top_p
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                row = torch.empty_like(row).scatter_(0, order, sorted_logits)
            probs = row.softmax(-1)
            out[i] = torch.multinomial(probs, 1, generator=self._generator(seqs[i]))[0]
        return out.tolist()
