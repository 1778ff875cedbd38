"""The one sampling routine: temperature, top-k, top-p, per-request seeds, log-probabilities.

Shape legend: B rows (sequences), V vocabulary.

Every token the engine emits, plain or speculative, goes through `SamplingBatch`: `sample` for
plain decoding, `probs` (the same distribution as a tensor) for the speculative acceptance rule.
Order of the transforms, as in transformers and vLLM: logits / temperature, then top-k, then top-p
on what top-k kept. Temperature 0 means greedy: argmax of the raw logits, no randomness used.

Sampling is `argmax(probs / E)` with E ~ Exponential(1) per vocabulary entry (the exponential-race
form of the Gumbel-max trick): an exact draw from `probs` with no `multinomial`, no cumulative
sums and no host sync. Each row draws its noise from its own `torch.Generator` (a request's seed
or the engine's generator), so a seeded request reproduces its tokens whatever else is batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Exponential noise of exactly 0 (possible: -log(1 - u) with u = 0) would turn 0 / 0 into NaN
TINY = 1e-20


@dataclass
class SamplingParams:
    """Per-request generation settings (names follow vLLM / the OpenAI API)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: the engine's generator
    stop_token_ids: Sequence[int] = ()  # ends the request; the token is kept in the output ids
    stop: Sequence[str] = ()  # stop strings (need the engine's tokenizer); cut from the text
    ignore_eos: bool = False  # keep going after the eos token
    logprobs: bool = False  # return each new token's log-probability (see `token_logprobs`)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        """ValueError naming the field for a bad value (the server turns it into a 400)."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not (0.0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} outside the vocabulary [0, {vocab_size})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {list(self.stop)!r}")


class SamplingBatch:
    """The per-row settings of one step's rows as tensors, built once per batch composition."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
        device: torch.device | str = "cpu",
    ):
        assert len(params) == len(generators)
        self.generators = list(generators)
        self.greedy_rows = [p.greedy for p in params]
        self.all_greedy = all(self.greedy_rows)
        # greedy rows get temperature 1 so `probs` and log-probs stay finite; they never sample
        temps = [1.0 if p.greedy else p.temperature for p in params]
        self.temperature = torch.tensor(temps, dtype=torch.float32, device=device)[:, None]
        self.greedy = torch.tensor(self.greedy_rows, device=device)  # [B] bool
        self.top_k = self.top_p = None
        if any(p.top_k > 0 and not p.greedy for p in params):
            self.top_k = torch.tensor([p.top_k for p in params], device=device)
        if any(p.top_p < 1.0 and not p.greedy for p in params):
            self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.want_logprobs = any(p.logprobs for p in params)

    def __len__(self) -> int:
        return len(self.generators)

    # ------------------------------------------------------------------ distributions
    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B,V] -> logits / T with the entries top-k and top-p drop set to -inf (fp32)."""
        x = logits.float() / self.temperature
        if self.top_k is None and self.top_p is None:
            return x
        sorted_x, order = x.sort(dim=-1, descending=True)  # [B,V]
        rank = torch.arange(x.shape[-1], device=x.device)
        if self.top_k is not None:
            k = torch.where(self.top_k > 0, self.top_k, x.shape[-1])
            sorted_x = sorted_x.masked_fill(rank >= k[:, None], float("-inf"))
        if self.top_p is not None:
            p = sorted_x.softmax(-1)
            # drop a token when the tokens ranked above it already hold top_p of the mass: the
            # smallest set reaching top_p is kept, and always the first token
            drop = ((p.cumsum(-1) - p) >= self.top_p[:, None]) & (self.top_p < 1.0)[:, None]
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.full_like(x, float("-inf")).scatter_(-1, order, sorted_x)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution each row samples from, [B,V] fp32; one-hot argmax on greedy rows."""
        p = self.filtered_logits(logits).softmax(-1)
        if any(self.greedy_rows):
            one_hot = torch.zeros_like(p).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
            p = torch.where(self.greedy[:, None], one_hot, p)
        return p

    # ------------------------------------------------------------------ draws
    def noise(self, shape: tuple[int, int], device) -> torch.Tensor:
        """Exponential(1) noise [B,V], each row from its own generator (none on greedy rows)."""
        # -log(1 - U), U ~ U[0,1): Tensor.exponential_ costs ~8 us a call on CPU against
        # uniform_'s ~2.4 (one call per row: 1.1 of a 128-row rollout step's ~4.4 ms)
        e = -torch.log1p(-self.uniform(shape[1], device))
        return e.clamp_min_(TINY)

    def draw(self, weights: torch.Tensor) -> torch.Tensor:
        """One index per row with probability proportional to `weights` [B,V] (>= 0, need not be
        normalised): argmax(weights / E), E ~ Exp(1). Greedy rows get argmax(weights)."""
        if self.all_greedy:
            return weights.argmax(-1)
        return (weights / self.noise(weights.shape, weights.device)).argmax(-1)

    def uniform(self, n: int, device) -> torch.Tensor:
        """U[0,1) [B,n], each row from its own generator (zeros on greedy rows)."""
        u = torch.zeros(len(self), n, device=device)
        # (rows by unbind: one call for all the views, where indexing is an operator per row)
        for row, g, greedy in zip(u.unbind(0), self.generators, self.greedy_rows):
            if not greedy:
                row.uniform_(generator=g)
        return u

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B,V] -> tokens [B] int64 (greedy rows: argmax of the raw logits)."""
        if self.all_greedy:
            return logits.argmax(-1)
        tokens = self.draw(self.filtered_logits(logits).softmax(-1))
        if any(self.greedy_rows):
            tokens = torch.where(self.greedy, logits.argmax(-1), tokens)
        return tokens

    def token_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log softmax(logits / T)[token] per row: logits [B,V] or [B,T,V], tokens [B] or [B,T].

        The temperature-scaled distribution before top-k/top-p truncation (T = 1 on greedy rows):
        what GRPO's importance ratio recomputes from the policy (TRL divides by the temperature
        too, and truncation would make the ratio undefined for dropped tokens)."""
        t = self.temperature if logits.dim() == 2 else self.temperature[:, :, None]
        lp = (logits.float() / t).log_softmax(-1)
        return lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `seed`, or from fresh OS entropy when None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
