"""Token sampling for a batch: greedy, temperature, min-p, top-k, top-p, penalties, logit bias, seeds."""

from __future__ import annotations

import torch

from hisa.engine.sequence import Sequence


class Sampler:
    """Picks the next token of each row of `logits`, in fp32.

    Rows with penalties or a logit bias get them first (greedy rows too). Greedy rows take the
    argmax. Sampled rows subtract their max logit before dividing by the temperature, so any
    temperature SamplingParams accepts (0 or >= 1.2e-38) gives finite logits: a tiny one puts all
    the mass on the top token, never inf/NaN. Then min-p, top-k, top-p (nucleus), and a draw. A
    request with a seed draws from its own generator, so its output does not depend on what else
    shares the batch.

    A failure in one row (a NaN logit from the model, ...) fails that row alone: `sample` returns
    the exception in its place and the other rows get their tokens.
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
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | Exception]:
        """logits: [B, V] (one row per sequence in `seqs`) → B token ids, or the exception that failed a
        row. One device-to-host read for the whole batch (`sample_on_device`, then `DeviceDraw.read`)."""
        return self.sample_on_device(logits, seqs).read()

    @torch.no_grad()
    def sample_on_device(self, logits: torch.Tensor, seqs: list[Sequence]) -> "DeviceDraw":
        """The batch's tokens, left on the device (nothing is read back): greedy rows take the argmax of
        the batch at once; the others are adjusted, filtered and drawn row by row, each draw a device
        tensor, so no row waits for the device. A row whose probabilities are not finite (a NaN or inf
        logit from the model) is marked failed on the device and draws from a placeholder
        distribution, so the token tensor always holds valid ids (overlap mode feeds it to the next
        step); its exception appears when the draw is read."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)  # [B] int64, on the device
        picked: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        errors: dict[int, Exception] = {}
        for i, seq in enumerate(seqs):  # per row: each may have its own generator and filters
            p = seq.params
            if p.greedy and not p.adjusts_logits:
                continue
            try:
                row = self._adjusted(logits[i], seq)
                picked[i] = (row.argmax(), None) if p.greedy else self._draw(row, seq)
            except Exception as e:  # noqa: BLE001 — handed to the engine, which fails this request alone
                errors[i] = e
        failed = None
        if picked:
            no = torch.zeros((), dtype=torch.bool, device=tokens.device)
            tokens = torch.stack([picked[i][0] if i in picked else tokens[i] for i in range(len(seqs))])
            if any(bad is not None for _, bad in picked.values()):
                failed = torch.stack([picked[i][1] if i in picked and picked[i][1] is not None else no
                                      for i in range(len(seqs))])
        return DeviceDraw(tokens=tokens, failed=failed, errors=errors)

    @staticmethod
    def _adjusted(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """`row` [V] fp32 with the request's logit bias and presence/frequency penalties applied."""
        p = seq.params
        if not p.adjusts_logits:
            return row
        row = row.clone()
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=row.device)
            row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device))
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output:
            ids, counts = torch.tensor(seq.output_token_ids, device=row.device).unique(return_counts=True)
            row[ids] -= counts.to(row.dtype) * p.frequency_penalty + p.presence_penalty
        return row

    def _draw(self, row: torch.Tensor, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """(the drawn token, whether the row's probabilities were not finite), both 0-d device tensors."""
        p = seq.params
        row = (row - row.max()) / p.temperature  # <= 0 with the top token at 0: no overflow, any temperature
        if p.min_p > 0.0:
            probs = row.softmax(-1)
            row = row.masked_fill(probs < p.min_p * probs.max(), float("-inf"))  # the top token always stays
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
        bad = ~torch.isfinite(probs).all()  # NaN logits: checked here, on the device, not by multinomial
        probs = torch.where(bad, torch.ones_like(probs), probs)  # finite rows keep theirs (the same draw)
        return torch.multinomial(probs, 1, generator=self._generator(seq))[0], bad


NOT_FINITE = "the row's probabilities are not finite (a NaN or inf logit)"


class DeviceDraw:
    """A batch's sampled tokens on the device, not read yet (`Sampler.sample_on_device`).

    tokens: int64 [B] device, valid token ids in every row (a failed row holds a placeholder);
    failed: bool [B] device, rows whose probabilities were not finite (None: none could be);
    errors: {row: exception} raised while a row was prepared (on the host).
    """

    def __init__(self, *, tokens: torch.Tensor, failed: torch.Tensor | None, errors: dict[int, Exception]):
        self.tokens, self.failed, self.errors = tokens, failed, errors

    def reported(self) -> torch.Tensor:
        """int64 [B] device: the tokens with -1 in the failed rows (what is copied to the host)."""
        if self.failed is None:
            return self.tokens
        return torch.where(self.failed, torch.full_like(self.tokens, -1), self.tokens)

    def read(self) -> list[int | Exception]:
        """The tokens on the host (one device-to-host read), an exception in each failed row."""
        return self.resolve(self.reported().tolist())

    def resolve(self, values: list[int]) -> list[int | Exception]:
        """`reported()` as read back → token ids, with each failed row's exception in its place."""
        out: list[int | Exception] = list(values)
        for i, v in enumerate(values):
            if v < 0:
                out[i] = RuntimeError(f"sampling failed: {NOT_FINITE}")
        for i, e in self.errors.items():
            out[i] = e
        return out
