"""`OpenAIServer`: from a parsed OpenAI request to engine requests, and back to responses.

Chat: messages -> the tokenizer's chat template -> prompt ids; completions: text (bos added)
or token ids. Limits are checked before anything reaches the engine: prompt + max_tokens must
fit the context (the engine's max_seq_len less the MTP drafts), max_tokens must not exceed the
server's cap, and the sequences in flight must not exceed `max_pending` (429). A request with
`n` choices is `n` engine requests; choice i samples with seed + i, so the choices differ and a
seeded request still reproduces. Responses are non-streamed JSON, or SSE streams built from the
engine's deltas as they come. Templating and tokenising run in a worker thread: a long
conversation takes a while to render, and the event loop must keep serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.serve.loop import EngineFailure, EngineLoop, RequestGroup
from nanoseek.serve.reasoning import ReasoningSplitter, prompt_opens_think, split_reasoning
from nanoseek.serve.schemas import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger("nanoseek.serve")


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(ErrorResponse.of(e).model_dump(), status_code=e.status)


def sse(obj) -> str:
    """One Server-Sent Event carrying a pydantic model (or a ready JSON string)."""
    return f"data: {obj if isinstance(obj, str) else obj.model_dump_json()}\n\n"


class SSEResponse(StreamingResponse):
    """A stream whose generator is always closed: with ASGI spec >= 2.4 Starlette reports a
    disconnect by raising from `send`, leaving the generator (and its abort in `finally`) to
    the garbage collector."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class OpenAIServer:
    """The request handling behind the routes: limits, sampling parameters, responses."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        model_name: str,
        *,
        max_tokens: int | None = None,
        max_pending: int = 256,
        disconnect_poll_s: float = 0.5,
    ):
        if engine.tokenizer is None:
            raise ValueError("the engine needs the tokenizer (stop strings, text deltas)")
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.loop = EngineLoop(engine, max_pending)
        # every prompt + completion must fit a cache row, with room for the MTP drafts
        self.context = engine.max_seq_len - engine.num_draft
        self.max_tokens = min(max_tokens or self.context, self.context)
        self.disconnect_poll_s = disconnect_poll_s
        self.created = int(time.time())

    # ------------------------------------------------------------------ checks
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                f"model {name!r} does not exist; this server serves {self.model_name!r}",
                404,
                code="model_not_found",
                param="model",
            )

    def new_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        """max_new_tokens for a prompt: the request's, else as many as the context allows."""
        room = self.context - prompt_len
        if room < 1:
            raise APIError(
                f"the prompt is {prompt_len} tokens; this model's context is {self.context} "
                "tokens (prompt + completion)",
                code="context_length_exceeded",
                param=param,
            )
        if requested is None:
            return min(self.max_tokens, room)
        if requested > room:
            raise APIError(
                f"this model's context is {self.context} tokens, but the request needs "
                f"{prompt_len + requested} ({prompt_len} in the prompt, {requested} for the "
                "completion)",
                code="context_length_exceeded",
                param="max_tokens",
            )
        if requested > self.max_tokens:
            raise APIError(
                f"max_tokens is {requested}; this server allows at most {self.max_tokens}",
                param="max_tokens",
            )
        return requested

    def params(self, req, max_new_tokens: int, choice: int) -> SamplingParams:
        p = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            # vLLM spells "off" -1; a k of the vocabulary or more is off too (and a huge one
            # would overflow the engine's int64 tensor, failing every request in the batch)
            top_k=req.top_k if 0 < req.top_k < self.engine.config.vocab_size else 0,
            # n choices from one seed must differ, and still reproduce: choice i uses seed + i
            seed=None if req.seed is None else req.seed + choice,
            stop=tuple(req.stop_list()),
            ignore_eos=req.ignore_eos,
        )
        try:
            p.validate(self.engine.config.vocab_size)
        except ValueError as e:
            raise APIError(str(e)) from None
        return p

    def submit(self, rid: str, prompts: list[list[int]], params: list[SamplingParams]):
        try:
            return self.loop.submit(rid, prompts, params)
        except ValueError as e:
            raise APIError(str(e), param="prompt") from None
        except OverflowError as e:
            raise APIError(
                f"{e}; retry later", 429, type="rate_limit_error", code="rate_limit_exceeded"
            ) from None
        except EngineFailure as e:
            raise APIError(str(e), 503, type="server_error", code="engine_unavailable") from None

    async def collect(self, group: RequestGroup, request: Request) -> RequestGroup:
        """Wait for a whole group, aborting it if the client disconnects meanwhile."""
        task = asyncio.ensure_future(group.wait())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.disconnect_poll_s)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ClientGone()
        finally:
            if not task.done():
                task.cancel()
            self.loop.abort(group)  # no-op once every request has finished

    # ------------------------------------------------------------------ chat
    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], bool]:
        """(prompt ids, whether the output starts inside <think>). Blocks: run it in a thread."""
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(req.messages)
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(f"messages: {e}", param="messages") from None
        prompt = self.tokenizer.encode(text)  # the rendered template starts with bos already
        return prompt, prompt_opens_think(text)  # R1: the output starts inside <think>

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        req.unsupported()
        prompt, opened = await asyncio.to_thread(self.chat_prompt, req)
        n_new = self.new_tokens(req.requested_max_tokens(), len(prompt), "messages")
        params = [self.params(req, n_new, i) for i in range(req.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        group = self.submit(rid, [prompt] * req.n, params)
        created = int(time.time())
        if req.stream:
            stream = self._chat_stream(group, opened, created, req.include_usage(), len(prompt))
            return SSEResponse(stream, headers=SSE_HEADERS)
        await self.collect(group, request)
        choices = []
        for i, s in enumerate(group.seqs):
            reasoning, content = split_reasoning(s.text, opened)
            message = AssistantMessage(content=content or "", reasoning_content=reasoning)
            choices.append(ChatChoice(index=i, message=message, finish_reason=s.finish_reason))
        usage = _usage(len(prompt), group.completion_tokens)
        body = ChatCompletion(
            id=rid, created=created, model=self.model_name, choices=choices, usage=usage
        )
        return JSONResponse(body.model_dump())

    async def _chat_stream(
        self, group: RequestGroup, opened: bool, created: int, include_usage: bool, n_prompt: int
    ) -> AsyncIterator[str]:
        def chunk(i: int, delta: ChatDelta, finish: str | None = None) -> str:
            choice = ChatChunkChoice(index=i, delta=delta, finish_reason=finish)
            return sse(
                ChatCompletionChunk(
                    id=group.request_id, created=created, model=self.model_name, choices=[choice]
                )
            )

        splitters = [ReasoningSplitter(opened) for _ in group.seqs]
        try:
            for i in range(len(group.seqs)):  # the role first, as OpenAI streams it
                yield chunk(i, ChatDelta(role="assistant", content=""))
            async for i, d in group.deltas():
                part = splitters[i].feed(d.text)
                if d.finished:
                    tail = splitters[i].finish()
                    part.reasoning += tail.reasoning
                    part.content += tail.content
                if part:
                    delta = ChatDelta(
                        content=part.content or None, reasoning_content=part.reasoning or None
                    )
                    yield chunk(i, delta)
                if d.finished:
                    yield chunk(i, ChatDelta(), d.finish_reason)
            if include_usage:
                yield sse(
                    ChatCompletionChunk(
                        id=group.request_id,
                        created=created,
                        model=self.model_name,
                        choices=[],
                        usage=_usage(n_prompt, group.completion_tokens),
                    )
                )
            yield "data: [DONE]\n\n"
        except EngineFailure as e:
            yield _stream_error(e)
        finally:  # also on disconnect: the generator is closed mid-way
            self.loop.abort(group)

    # ------------------------------------------------------------------ completions
    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The prompts as token ids (text gets bos). Blocks: run it in a thread."""
        texts = req.prompts()
        # a 1 MiB body holds 250k one-token prompts: refuse what can never run before any work
        if len(texts) * req.n > self.loop.max_pending:
            raise APIError(
                f"the request needs {len(texts) * req.n} sequences ({len(texts)} prompts x "
                f"n={req.n}); this server holds at most {self.loop.max_pending}",
                param="prompt",
            )
        prompts = []
        for p in texts:
            if isinstance(p, str):
                prompts.append(self.tokenizer.encode(p, add_bos=True))
            elif not p:
                raise APIError("prompt is empty", param="prompt")
            else:
                prompts.append(list(p))
        return prompts

    async def complete(self, req: CompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        req.unsupported()
        prompts = await asyncio.to_thread(self.completion_prompts, req)
        requested = req.requested_max_tokens()
        all_prompts, params = [], []
        for p in prompts:  # choice index = prompt index * n + j, as OpenAI numbers them
            n_new = self.new_tokens(requested, len(p), "prompt")
            all_prompts += [p] * req.n
            params += [self.params(req, n_new, j) for j in range(req.n)]
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        group = self.submit(rid, all_prompts, params)
        created = int(time.time())
        n_prompt = sum(len(p) for p in prompts)
        if req.stream:
            stream = self._completion_stream(group, created, req.include_usage(), n_prompt)
            return SSEResponse(stream, headers=SSE_HEADERS)
        await self.collect(group, request)
        choices = [
            CompletionChoice(index=i, text=s.text, finish_reason=s.finish_reason)
            for i, s in enumerate(group.seqs)
        ]
        body = Completion(
            id=rid,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=_usage(n_prompt, group.completion_tokens),
        )
        return JSONResponse(body.model_dump())

    async def _completion_stream(
        self, group: RequestGroup, created: int, include_usage: bool, n_prompt: int
    ) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(
                Completion(
                    id=group.request_id,
                    created=created,
                    model=self.model_name,
                    choices=choices,
                    usage=usage,
                )
            )

        try:
            async for i, d in group.deltas():
                if d.text or d.finished:
                    yield chunk(
                        [CompletionChoice(index=i, text=d.text, finish_reason=d.finish_reason)]
                    )
            if include_usage:
                yield chunk([], _usage(n_prompt, group.completion_tokens))
            yield "data: [DONE]\n\n"
        except EngineFailure as e:
            yield _stream_error(e)
        finally:
            self.loop.abort(group)

    # ------------------------------------------------------------------ the rest
    def models(self) -> ModelList:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.context)
        return ModelList(data=[card])

    def metrics(self) -> dict:
        e = self.engine
        return {
            "model": self.model_name,
            "requests_running": len(e.running),
            "requests_waiting": len(e.waiting),
            "sequences_in_flight": self.loop.pending,
            "max_batch_size": e.max_batch_size,
            "max_pending": self.loop.max_pending,
            "context": self.context,
            **self.loop.stats.to_dict(),
        }


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _stream_error(e: Exception) -> str:
    log.error("stream failed: %s", e)
    err = APIError(str(e), 500, type="server_error", code="engine_error")
    return sse(ErrorResponse.of(err).model_dump_json()) + "data: [DONE]\n\n"
