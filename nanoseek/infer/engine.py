"""The engine: the one place that generates tokens (API, CLI, server, GRPO rollouts, evaluation).

Requests go in with `add_request` (token ids or text, plus `SamplingParams`); every `step()` runs
one iteration of continuous batching and returns the `Delta`s it produced:

1. admit: waiting requests take free rows of the cache (up to `max_batch_size` running) and are
   prefilled together (right-padded, plain MLA path); each gets its first token.
2. decode: every running request advances one token (absorbed MLA over the latent cache), or
   1..k+1 tokens with `speculative="mtp"` (draft with the MTP module, verify in one forward).
3. finish: eos ids (the config's, and with a tokenizer its `stop_ids`: eos and the chat
   template's end-of-turn token), stop token ids, stop strings (when a tokenizer is given),
   max_new_tokens, aborts;
   a finished request's row is refilled by the last running row so rows stay 0..n-1.

Requests join and leave between steps (continuous batching), so concurrent callers share one
batched forward instead of waiting for each other. `step()` must be driven by one thread; other
threads may call `add_request` and `abort` at any time (they only touch a locked queue). A
server runs `step()` in a loop in its own thread and routes deltas by `request_id`;
`stream()` and `generate()` drive the loop themselves for single callers (API, CLI, GRPO).

Token ids vs text: `Delta.token_ids` holds every token the model produced, stop tokens included
(GRPO needs the eos in the completion); `Delta.text` (with a tokenizer) skips special tokens and
ends before a stop string.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.infer.detokenize import Detokenizer
from nanoseek.infer.runner import ModelRunner
from nanoseek.infer.sampling import SamplingBatch, SamplingParams, make_generator
from nanoseek.infer.speculative import MTPSpeculator
from nanoseek.model.transformer import CausalLM

SPECULATIVE = (None, "mtp")


@dataclass
class Delta:
    """What one step produced for one request (several tokens when speculative)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # "" without a tokenizer
    logprobs: list[float] | None = None  # when the request asked for them
    finish_reason: str | None = None  # None while running; "stop", "length" or "abort"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    """A finished request (what `Engine.generate` returns)."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str


class Request:
    """A request's state while it waits or runs (vLLM's `Sequence`)."""

    def __init__(self, request_id, prompt_ids, params, generator, detok):
        self.request_id: str = request_id
        self.prompt_ids: list[int] = prompt_ids
        self.params: SamplingParams = params
        self.generator: torch.Generator = generator
        self.detok: Detokenizer | None = detok
        self.output_ids: list[int] = []  # the last one is fed to the model at the next step
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.text = ""
        self.row = -1
        self.finish_reason: str | None = None
        # speculative decoding: main hidden states and next tokens the MTP cache has not seen
        self.mtp_hidden: torch.Tensor | None = None
        self.mtp_next: list[int] = []


class Engine:
    """Continuous-batching generation over one model; see the module docstring."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer=None,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        speculative: str | None = None,
        num_draft: int = 1,
        draft_quantize: str | None = "auto",
        seed: int | None = None,
        quantize: str | None = None,
        exact: bool = False,
        weights=None,
    ):
        """model: a CausalLM, used as it is (a trainer may keep updating it: GRPO rollouts;
        every step runs it in eval mode and restores its mode). tokenizer: optional; needed for
        text prompts, `Delta.text` and stop strings. max_seq_len: cache positions per row
        (prompt + max_new_tokens + num_draft must fit), default min(max_position_embeddings,
        4096); the cache is allocated once for max_batch_size rows of it.
        speculative: None or "mtp" (draft num_draft tokens per step with the MTP module).
        draft_quantize: the weights the MTP module drafts with: "int8" (weight-only int8 copies
        of the module and the head: the drafts only propose, the verify step in the model's own
        weights decides: greedy output is unchanged, sampling keeps the model's distribution),
        None (the engine's), or "auto": int8 where the native kernels decode on CPU (not
        `exact`) and a draft reads at least runner.DRAFT_INT8_BYTES of weights.
        seed: the generator of requests without their own seed. quantize: None (the model's
        dtype) or "int8": decode with weight-only int8 copies of the weights (faster on CPU, not
        token-identical; nanoseek/infer/quant.py). exact: decode an fp32 model through
        PyTorch's operators only, as on a machine without nanoseek's native kernels
        (nanoseek/infer/native.py, which up to 256 rows of an fp32 model otherwise go through:
        the same maths, sums added in another order, so logits differ in the last bits): the
        bits such a machine gets. weights: the int8
        decode weights of a model loaded with `nanoseek.infer.streamed.load_int8` (its modules
        hold none)."""
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {SPECULATIVE}, got {speculative!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or min(self.config.max_position_embeddings, 4096)
        self.runner = ModelRunner(
            model,
            max_batch_size,
            self.max_seq_len,
            mtp=speculative == "mtp",
            quantize=quantize,
            exact=exact,
            weights=weights,
            draft_quantize=draft_quantize,
        )
        self.speculator = MTPSpeculator(self.runner, num_draft) if speculative else None
        self.num_draft = num_draft if speculative else 0
        eos = self.config.eos_token_id
        eos = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
        if tokenizer is not None:  # eos, and the chat template's end of turn (`<|im_end|>`)
            eos.extend(getattr(tokenizer, "stop_ids", (tokenizer.eos_id,)))
        self.eos_ids = frozenset(eos)  # stop ids of every request that does not ignore_eos
        self.generator = make_generator(seed, model.device)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # index == cache row
        self._lock = threading.Lock()  # guards `waiting` and `_aborts`
        self._aborts: set[str] = set()
        self._ids = itertools.count()
        self._batch: SamplingBatch | None = None  # rebuilt when `running` changes

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: Sequence[int] | str,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; it joins the running batch at the next `step()`. Thread-safe.
        Raises ValueError for a bad prompt or parameters (the message names the field)."""
        return self._add(prompt, params, request_id).request_id

    def _add(self, prompt, params: SamplingParams | None, request_id: str | None) -> Request:
        params = params or SamplingParams()
        params.validate(self.config.vocab_size)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs an engine with a tokenizer")
            prompt = self.tokenizer.encode(prompt, add_bos=True)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt ids {bad[:5]} outside the vocabulary [0, {self.config.vocab_size})"
            )
        # the last token is never fed back; verification writes num_draft positions past it
        need = len(prompt) + params.max_new_tokens + self.num_draft
        if need > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens})"
                + (f" + num_draft ({self.num_draft})" if self.num_draft else "")
                + f" exceeds the engine's max_seq_len {self.max_seq_len}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer (use stop_token_ids)")
        dev = self.model.device
        gen = self.generator if params.seed is None else make_generator(params.seed, dev)
        detok = Detokenizer(self.tokenizer, params.stop) if self.tokenizer is not None else None
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if any(r.request_id == rid for r in itertools.chain(self.waiting, self.running)):
                raise ValueError(f"request_id {rid!r} is already in use")
            req = Request(rid, prompt, params, gen, detok)
            self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Stop a request; its last delta (finish_reason "abort") comes from the next step.
        Thread-safe; unknown or finished ids are ignored."""
        with self._lock:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def reset(self) -> None:
        """Drop every request, waiting or running, without a final delta, and empty the cache:
        what a server does after a failed step left rows half-updated. Thread-safe."""
        with self._lock:
            self.waiting.clear()
            self._aborts.clear()
        for req in self.running:
            req.row = -1
        self.running.clear()
        self._batch = None
        self.runner.reset()

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """One iteration: abort, admit + prefill, one decode (or draft + verify) step."""
        deltas: dict[str, Delta] = {}
        training = self.model.training
        if training:  # MoE in train mode would count rollout tokens in its balance statistics
            self.model.eval()
        try:
            self._handle_aborts(deltas)
            new = self._admit()
            if new:
                self._prefill(new, deltas)
                self._drop_finished()
            if self.running:
                self._decode(deltas)
                self._drop_finished()
        finally:
            if training:
                self.model.train()
        return list(deltas.values())

    def stream(
        self,
        prompts: Sequence[Sequence[int] | str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[Delta]:
        """Add `prompts` and yield their deltas until all finish. Drives `step()` itself, so the
        engine must be idle (a server drives `step()` instead). Leaving the loop early aborts
        the remaining requests."""
        self._run_alone(prompts, params)
        try:
            while self.has_unfinished():
                yield from self.step()
        finally:
            if self.has_unfinished():
                with self._lock:
                    self._aborts.update(r.request_id for r in self.waiting)
                    self._aborts.update(r.request_id for r in self.running)
                while self.has_unfinished():
                    self.step()

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Blocking: one Completion per prompt, in the prompts' order."""
        reqs = self._run_alone(prompts, params)
        while self.has_unfinished():
            self.step()
        return [
            Completion(
                r.request_id, r.prompt_ids, r.output_ids, r.text, r.logprobs, r.finish_reason
            )
            for r in reqs
        ]

    def _run_alone(self, prompts, params) -> list[Request]:
        if self.has_unfinished():
            raise RuntimeError("stream()/generate() need an idle engine (a server calls step())")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of prompts (token id lists or strings)")
        if not isinstance(params, (list, tuple)):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        try:
            return [self._add(p, sp, None) for p, sp in zip(prompts, params)]
        except ValueError:
            with self._lock:
                self.waiting.clear()
            raise

    # ------------------------------------------------------------------ internals
    def _handle_aborts(self, deltas) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            dropped = [r for r in self.waiting if r.request_id in aborts]
            for req in dropped:
                self.waiting.remove(req)
        for req in dropped + [r for r in self.running if r.request_id in aborts]:
            req.finish_reason = "abort"
            self._delta(deltas, req).finish_reason = "abort"
        self._drop_finished()

    def _admit(self) -> list[Request]:
        new = []
        with self._lock:
            while self.waiting and len(self.running) + len(new) < self.max_batch_size:
                new.append(self.waiting.popleft())
        return new

    def _prefill(self, new: list[Request], deltas) -> None:
        row0 = len(self.running)
        for b, seq in enumerate(new):
            seq.row = row0 + b
        self.running += new
        self._batch = None
        lens = [len(s.prompt_ids) for s in new]
        dev = self.model.device
        ids = torch.zeros(len(new), max(lens), dtype=torch.long, device=dev)  # right-padded
        for b, s in enumerate(new):
            ids[b, : lens[b]] = torch.tensor(s.prompt_ids, device=dev)
        logits, h = self.runner.prefill(ids, lens, row0)  # [B,Vocab], [B,T,D]
        sb = SamplingBatch([s.params for s in new], [s.generator for s in new], dev)
        tokens = sb.sample(logits)
        lps = sb.token_logprobs(logits, tokens).tolist() if sb.want_logprobs else None
        for b, (seq, tok) in enumerate(zip(new, tokens.tolist())):
            self._emit(deltas, seq, [tok], None if lps is None else [lps[b]])
        if self.speculator is not None:
            self.speculator.prefill(new, ids, h, row0)

    def _decode(self, deltas) -> None:
        if self._batch is None:
            self._batch = SamplingBatch(
                [s.params for s in self.running],
                [s.generator for s in self.running],
                self.model.device,
            )
        sb, seqs = self._batch, self.running
        if self.speculator is not None:
            tokens, lps = self.speculator.step(seqs, sb)
        else:
            ids = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.model.device)
            logits, _ = self.runner.decode(ids)  # commits each row's length + 1
            logits = logits[:, -1]
            tok = sb.sample(logits)
            tokens = [[t] for t in tok.tolist()]
            lps = [None] * len(seqs)
            if sb.want_logprobs:
                lps = [[x] for x in sb.token_logprobs(logits, tok).tolist()]
        for seq, toks, lp in zip(seqs, tokens, lps):
            self._emit(deltas, seq, toks, lp if seq.logprobs is not None else None)

    def _delta(self, deltas, seq: Request) -> Delta:
        d = deltas.get(seq.request_id)
        if d is None:
            d = deltas[seq.request_id] = Delta(seq.request_id)
            if seq.logprobs is not None:
                d.logprobs = []
        return d

    def _emit(self, deltas, seq: Request, tokens: list[int], lps: list[float] | None) -> None:
        """Append new tokens to `seq` up to the first stop condition; record them in its delta."""
        d = self._delta(deltas, seq)
        p = seq.params
        for i, tok in enumerate(tokens):
            seq.output_ids.append(tok)
            d.token_ids.append(tok)
            if seq.logprobs is not None and lps is not None:
                seq.logprobs.append(lps[i])
                d.logprobs.append(lps[i])
            ends_turn = tok in self.eos_ids and not p.ignore_eos
            if seq.detok is not None and not ends_turn:  # an end-of-turn token is not text,
                new_text = seq.detok.add(tok)  # even one a tokenizer does not mark special
                seq.text += new_text
                d.text += new_text
            if ends_turn or tok in p.stop_token_ids:
                seq.finish_reason = "stop"
            elif seq.detok is not None and seq.detok.stopped is not None:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= p.max_new_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                if seq.detok is not None:
                    new_text = seq.detok.flush()
                    seq.text += new_text
                    d.text += new_text
                d.finish_reason = seq.finish_reason
                break

    def _drop_finished(self) -> None:
        """Remove finished rows; the last running row moves into each hole."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.finish_reason is None:
                i += 1
                continue
            last = len(self.running) - 1
            if i != last:
                self.runner.move_row(last, i)
                self.running[i] = self.running[last]
                self.running[i].row = i
            self.running.pop()
            seq.row = -1
            self._batch = None
