"""`EngineLoop`: the one thread that owns the engine, and the async side of each request.

The engine is not thread-safe except for `add_request` / `abort`, and a forward blocks for
milliseconds to seconds, so it cannot run on the server's event loop. One background thread
calls `engine.step()` while any request is unfinished and sleeps otherwise. Request handlers
(on the event loop) register a `RequestGroup` and call `add_request`; after every step the
thread hands that step's deltas to the event loop in one `call_soon_threadsafe`, which routes
each to its group's `asyncio.Queue`. Requests that arrive while others run join the batch at
the next step (the engine's continuous batching), so concurrent requests share every forward.

    event loop (uvicorn)                        engine thread
    submit(): groups[id] = group, add_request   ->  (locked queue), wake
    async for i, delta in group.deltas()      <-  step() -> deltas -> call_soon_threadsafe
    abort() when the client goes away         ->  engine.abort: the next step drops it

One HTTP request is one group of engine requests (`n` choices, several completion prompts)
sharing one queue. `groups` is touched only on the event loop, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence

from nanoseek.infer.engine import Delta, Engine
from nanoseek.infer.sampling import SamplingParams

log = logging.getLogger("nanoseek.serve")


class EngineFailure(RuntimeError):
    """`engine.step()` raised: every request in flight fails with this (HTTP 500)."""


class SeqState:
    """What one engine request has produced so far."""

    def __init__(self, request_id: str, prompt_len: int):
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None


class RequestGroup:
    """The engine requests of one HTTP request; their deltas arrive on one queue."""

    def __init__(self, request_id: str, prompt_lens: Sequence[int]):
        self.request_id = request_id
        self.seqs = [SeqState(f"{request_id}-{i}", n) for i, n in enumerate(prompt_lens)]
        self.index = {s.request_id: i for i, s in enumerate(self.seqs)}
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(sequence index, delta) until every sequence finishes; raises EngineFailure."""
        while not self.finished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            i = self.index[item.request_id]
            s = self.seqs[i]
            s.token_ids += item.token_ids
            s.text += item.text
            s.finish_reason = item.finish_reason
            yield i, item

    async def wait(self) -> RequestGroup:
        async for _ in self.deltas():
            pass
        return self

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


class LoopStats:
    """Counters written by the engine thread, read by /metrics (plain ints: no lock needed)."""

    def __init__(self):
        self.started = time.time()
        self.requests = 0  # engine requests submitted (a request with n=4 counts 4)
        self.aborted = 0
        self.steps = 0  # steps that produced tokens
        self.tokens = 0
        self.step_seconds = 0.0
        self.max_batch = 0  # most requests that advanced in one step
        self.batch_sizes: Counter[int] = Counter()
        self.errors = 0

    def to_dict(self) -> dict:
        n = sum(self.batch_sizes.values())
        mean = sum(k * v for k, v in self.batch_sizes.items()) / n if n else 0.0
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests_total": self.requests,
            "requests_aborted": self.aborted,
            "engine_steps": self.steps,
            "tokens_generated": self.tokens,
            "engine_busy_s": round(self.step_seconds, 3),
            "max_batch_size_seen": self.max_batch,
            "mean_batch_size": round(mean, 2),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "engine_errors": self.errors,
        }


class EngineLoop:
    def __init__(self, engine: Engine, max_pending: int = 256):
        """max_pending: most engine requests in flight (running + waiting); `submit` beyond it
        raises OverflowError (the server answers 429)."""
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.engine = engine
        self.max_pending = max_pending
        self.groups: dict[str, RequestGroup] = {}  # engine request id -> its group
        self.stats = LoopStats()
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self, aloop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; deltas go to `aloop` (default: the running loop)."""
        if self.alive:
            raise RuntimeError("EngineLoop already started")
        self._aloop = aloop or asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is in flight and end the thread (after its current step)."""
        for rid in list(self.groups):
            self.engine.abort(rid)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return len(self.groups)

    # ------------------------------------------------------------------ requests (event loop)
    def submit(
        self, request_id: str, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> RequestGroup:
        """Queue one engine request per (prompt, params), ids `request_id-i`. All or none:
        ValueError for a bad request, OverflowError when the server is full."""
        if not self.alive:
            raise EngineFailure("the engine loop is not running")
        if self.pending + len(prompts) > self.max_pending:
            raise OverflowError(
                f"server busy: {self.pending} sequences in flight, at most {self.max_pending}"
            )
        group = RequestGroup(request_id, [len(p) for p in prompts])
        try:
            for s, prompt, p in zip(group.seqs, prompts, params):
                self.groups[s.request_id] = group  # before add_request: no delta can miss it
                self.engine.add_request(prompt, p, request_id=s.request_id)
        except ValueError:
            self._drop(group)
            raise
        self.stats.requests += len(group.seqs)
        self._wake.set()
        return group

    def abort(self, group: RequestGroup) -> None:
        """Stop a group's unfinished requests (a client went away); finished ones are ignored."""
        self.stats.aborted += self._drop(group)
        self._wake.set()

    def _drop(self, group: RequestGroup) -> int:
        n = 0
        for s in group.seqs:
            if self.groups.pop(s.request_id, None) is not None:
                self.engine.abort(s.request_id)
                n += 1
        return n

    def _dispatch(self, deltas: list[Delta]) -> None:  # on the event loop
        for d in deltas:
            group = self.groups.get(d.request_id)
            if group is None:  # aborted by us: nobody is listening
                continue
            group.queue.put_nowait(d)
            if d.finished:
                del self.groups[d.request_id]

    def _fail_all(self, error: BaseException) -> None:  # on the event loop
        groups, self.groups = self.groups, {}
        for group in {id(g): g for g in groups.values()}.values():
            group.queue.put_nowait(error)

    # ------------------------------------------------------------------ the engine thread
    def _post(self, fn, arg) -> None:
        try:
            self._aloop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self._stop.set()

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self._wake.clear()  # before the check, so a submit after it is not missed
            if not engine.has_unfinished():
                self._wake.wait(timeout=1.0)
                continue
            t0 = time.perf_counter()
            try:
                deltas = engine.step()
            except Exception as e:  # a bug: fail the requests in flight, keep serving
                log.exception("engine step failed; failing all requests in flight")
                self.stats.errors += 1
                self._reset_engine()
                self._post(self._fail_all, EngineFailure(f"engine step failed: {e}"))
                continue
            batch = sum(1 for d in deltas if d.token_ids)
            if batch:
                st = self.stats
                st.step_seconds += time.perf_counter() - t0
                st.steps += 1
                st.tokens += sum(len(d.token_ids) for d in deltas)
                st.batch_sizes[batch] += 1
                st.max_batch = max(st.max_batch, batch)
            if deltas:
                self._post(self._dispatch, deltas)

    def _reset_engine(self) -> None:
        # after a failed step the engine's rows may be half-updated: drop every request
        self.engine.reset()
