"""Token sampling for a batch: greedy, temperature, min-p, top-k, top-p, penalties, logit bias, seeds."""

from __future__ import annotations

from collections import Counter

import torch

from hisa.engine.sequence import Sequence
from hisa.ops.argmax import argmax


class Sampler:
    """Picks the next token of each row of `logits`, in fp32.

    Rows with penalties or a logit bias get them first (greedy rows too). Greedy rows take the
    argmax. Sampled rows subtract their max logit before dividing by the temperature, so any
    temperature SamplingParams accepts (0 or >= 1.2e-38) gives finite logits: a tiny one puts all
    the mass on the top token, never inf/NaN. Then min-p, top-k, top-p (nucleus), and a draw: the
    sampled rows of a step are filtered together, as one [n, V] batch with per-row parameters, and
    each draws by inverse CDF (the first token whose cumulative probability exceeds u x total) with
    one uniform u per row. A request with a seed takes its u from its own generator, so its output
    does not depend on what else shares the batch; unseeded rows take theirs from the engine's
    generator, in row order.

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
        """The batch's tokens, left on the device (nothing is read back): rows with penalties or a
        logit bias are adjusted one by one, greedy rows take the argmax of the batch at once, and the
        sampled rows are filtered and drawn together (`_draw_rows`). A row whose probabilities are
        not finite (a NaN or inf logit from the model) is marked failed on the device and drawn from a
        placeholder distribution, so the token tensor always holds valid ids (overlap mode feeds it
        to the next step); its exception appears when the draw is read."""
        errors: dict[int, Exception] = {}
        adjust = [i for i, seq in enumerate(seqs) if seq.params.adjusts_logits]
        rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if adjust or rows or logits.stride(-1) != 1:  # (an all-greedy batch reads the model's logits as they are)
            logits = logits.float()
        if adjust:
            logits = logits.clone()
            for i in adjust:
                try:
                    logits[i] = self._adjusted(logits[i], seqs[i])
                except Exception as e:  # noqa: BLE001 — handed to the engine, which fails this request alone
                    errors[i] = e
        tokens = argmax(logits)  # [B] int64, on the device (the first maximum, as torch.argmax)
        rows = [i for i in rows if i not in errors]
        failed = None
        if rows:
            failed = torch.zeros(len(seqs), dtype=torch.bool, device=tokens.device)
            per = max(1, self.DRAW_ELEMENTS // logits.shape[-1])  # rows filtered at once: bounded memory
            for a in range(0, len(rows), per):
                part = rows[a:a + per]
                idx = self._on_device(part, torch.int64)
                drawn, bad = self._draw_rows(logits.index_select(0, idx), [seqs[i] for i in part])
                tokens = tokens.index_copy(0, idx, drawn)
                failed = failed.index_copy(0, idx, bad)
        return DeviceDraw(tokens=tokens, failed=failed, errors=errors)

    DRAW_ELEMENTS = 1 << 25  # logits of the rows drawn together (x ~6 fp32 temporaries): 32 rows of 1M tokens

    def _on_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small host list on the sampler's device without a sync (pinned, copied asynchronously)."""
        t = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _draw_rows(self, x: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [n, V] fp32 logits of the sampled rows → (their tokens int64 [n], bool [n] rows whose
        probabilities were not finite), on the device: temperature, min-p, top-k, top-p as per-row
        vectors, then one inverse-CDF draw per row."""
        ps = [seq.params for seq in seqs]
        V = x.shape[-1]
        ks = [p.top_k if p.top_k and p.top_k < V else 0 for p in ps]
        inf = float("inf")
        knobs = self._on_device([[p.temperature for p in ps], [p.min_p for p in ps], [float(k) for k in ks],
                                 [p.top_p if p.top_p < 1.0 else inf for p in ps]], torch.float32)  # [4, n]
        temp, min_p, top_k, top_p = (knobs[j][:, None] for j in range(4))
        x = (x - x.max(-1, keepdim=True).values) / temp  # <= 0 with the top token at 0: any temperature
        if any(p.min_p > 0.0 for p in ps):
            probs = x.softmax(-1)
            x = x.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, -inf)  # the top token stays
        nucleus = any(p.top_p < 1.0 for p in ps)
        sorted_x = order = None
        if any(ks):
            k = top_k.long()
            sorted_x, order = torch.topk(x, max(ks), dim=-1)  # [n, K], descending
            kth = sorted_x.gather(1, (k - 1).clamp(min=0))  # each row's k-th largest logit
            x = x.masked_fill((k > 0) & (x < kth), -inf)
            sorted_x = sorted_x.masked_fill((k > 0) & (sorted_x < kth), -inf)
            if any(p.top_p < 1.0 and not k_ for p, k_ in zip(ps, ks)):
                sorted_x = None  # a nucleus row without top-k needs its whole row sorted
        if nucleus:
            lse = None  # set when the candidates may not hold a whole row's mass
            if sorted_x is not None:
                # top-k's candidates: K tokens, but the top-k mask keeps every token tied with the k-th
                # logit, and those past K are not among them (common with bf16 logits)
                lse = torch.logsumexp(x, -1, keepdim=True)
            elif x.device.type == "cpu":
                sorted_x, order, lse = self._nucleus_candidates(x, top_p)
            if sorted_x is None:
                sorted_x, order = torch.sort(x, dim=-1, descending=True)
            # probabilities against the whole row (a softmax over the candidates when they are all of it)
            probs = sorted_x.softmax(-1) if lse is None else (sorted_x - lse).exp()
            # drop a token when the mass before it already reaches top_p; the first one always stays,
            # also when top_p is below the smallest fp32 (a valid 1e-300 is 0 in fp32: 0 >= 0)
            drop = (probs.cumsum(-1) - probs >= top_p) & (top_p <= 1.0)
            drop[:, 0] = False
            kept = sorted_x.masked_fill(drop, -inf)
            if lse is not None:
                # the tokens outside the candidates come after them (ties of the k-th logit, or less likely
                # than every candidate): dropped where the candidates already reach top_p (the CPU's
                # candidates always do); else top-k's ties stay, the nucleus being among equal logits
                reached = probs.sum(-1, keepdim=True) >= top_p
                x = torch.where((top_p <= 1.0) & reached, torch.full_like(x, -inf), x)
            x = x.scatter(1, order, kept)
        cdf = x.softmax(-1).cumsum(-1)
        bad = ~torch.isfinite(cdf[:, -1])  # NaN logits: marked here, on the device (any NaN reaches the total)
        u = self._uniforms(seqs, x.device)
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        return tokens.clamp_(0, V - 1), bad

    NUCLEUS_CANDIDATES = 1024  # CPU: top-p looks for the nucleus among this many tokens first

    def _nucleus_candidates(self, x: torch.Tensor, top_p: torch.Tensor):
        """CPU only (a read of the values, which on the CPU waits for nothing): the most likely
        `NUCLEUS_CANDIDATES` tokens of each row, sorted, if they hold more than top_p of every nucleus
        row's mass, so that its nucleus is among them (a partial sort instead of the whole vocabulary's:
        ~7x less for 49K tokens), with each row's log-sum-exp [n, 1]; else (None, None, None)."""
        K = min(self.NUCLEUS_CANDIDATES, x.shape[-1])
        vals, order = torch.topk(x, K, dim=-1)
        lse = torch.logsumexp(x, -1, keepdim=True)
        mass = (vals - lse).exp().sum(-1, keepdim=True)
        if bool(((mass > top_p + 1e-4) | (top_p > 1.0)).all()):
            return vals, order, lse
        return None, None, None

    def _uniforms(self, seqs: list[Sequence], device: torch.device) -> torch.Tensor:
        """One uniform in [0, 1) per row, fp32 [n]: a seeded row's from its own generator, the others'
        from the engine's, in row order."""
        shared = [j for j, seq in enumerate(seqs) if seq.params.seed is None]
        us: list[torch.Tensor | None] = [None] * len(seqs)
        if shared:
            draws = torch.rand(len(shared), generator=self.generator, device=device)
            for n, j in enumerate(shared):
                us[j] = draws[n]
        for j, seq in enumerate(seqs):
            if us[j] is None:
                us[j] = torch.rand((), generator=self._generator(seq), device=device)
        return torch.stack(us)

    def _adjusted(self, row: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """`row` [V] fp32 with the request's logit bias and presence/frequency penalties applied. The
        token counts are made on the host and sent with the bias by asynchronous copies: no sync."""
        p = seq.params
        if not p.adjusts_logits:
            return row
        ids: list[int] = []
        delta: list[float] = []
        if p.logit_bias:
            ids += [int(t) for t in p.logit_bias]
            delta += [float(b) for b in p.logit_bias.values()]
        if p.penalizes and seq.num_output:
            for token, n in Counter(seq.output_token_ids).items():
                ids.append(token)
                delta.append(-(n * p.frequency_penalty + p.presence_penalty))
        if not ids:
            return row
        return row.index_add(0, self._on_device(ids, torch.int64), self._on_device(delta, row.dtype))


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
