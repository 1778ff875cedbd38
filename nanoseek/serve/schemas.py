"""Request and response bodies of the OpenAI-compatible API (pydantic), and its error body.

Field names and defaults follow the OpenAI API (temperature 1, top_p 1, n 1; completions
default to 16 new tokens), plus a few vLLM extensions (`top_k`, `ignore_eos`). Ranges are
checked here so a bad value is a 400 naming the field before anything reaches the engine.
Unknown fields are ignored (clients send many we do not use); fields we know but cannot honour
(`logprobs`, tools, penalties other than 0) are rejected by `unsupported()` rather than
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; vLLM any number)
INT64 = 2**63  # seeds are signed 64-bit integers, as in OpenAI's API


class APIError(Exception):
    """A request the server refuses: becomes `{"error": {...}}` with `status`."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = "invalid_value",
        param: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.code, self.param = (
            message,
            status,
            type,
            code,
            param,
        )


def valid_text(text: str, where: str, param: str) -> str:
    """`text` if it is valid Unicode. JSON can spell a lone surrogate ("\\ud800"), which no
    encoding (nor the tokenizer) accepts: refuse it here, naming where it was."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            f"{where}: lone surrogate {text[e.start]!r} at character {e.start}; text must be "
            "valid Unicode",
            param=param,
        ) from None
    return text


class ErrorInfo(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

    @classmethod
    def of(cls, e: APIError) -> ErrorResponse:
        # a message may quote the request; a lone surrogate in it would fail the JSON encoding
        message = e.message.encode("utf-8", "backslashreplace").decode("utf-8")
        return cls(error=ErrorInfo(message=message, type=e.type, code=e.code, param=e.param))


# ------------------------------------------------------------------------------ requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "user", "metadata", "store"


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # of earlier assistant turns: not fed back (R1)

    def text(self, index: int) -> str:
        """The message's text (content parts joined); only text parts are supported."""
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise APIError(f"messages[{index}].content is missing", param="messages")
        where = f"messages[{index}].content"
        if isinstance(self.content, str):
            return valid_text(self.content, where, "messages")
        bad = [p.type for p in self.content if p.type != "text" or p.text is None]
        if bad:
            raise APIError(
                f"messages[{index}].content: only text parts are supported, got {bad[0]!r}",
                param="messages",
            )
        return valid_text("".join(p.text for p in self.content), where, "messages")


class _Sampling(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)  # vLLM extension; 0 or -1: off
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension: always generate max_tokens
    # known but unsupported: must keep their neutral values
    logprobs: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise APIError("stop strings must be non-empty", param="stop")
        return [valid_text(s, "stop", "stop") for s in stop]

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> None:
        if self.logprobs not in (None, False, 0):
            raise APIError("logprobs are not supported by this server", param="logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(f"{name} is not supported by this server", param=name)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> None:
        super().unsupported()
        if self.tools:
            raise APIError("tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError("only response_format type 'text' is supported", param="response_format")


class CompletionRequest(_Sampling):
    # a string, a list of strings, one list of token ids, or a list of token-id lists
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [valid_text(p, "prompt", "prompt")]
        if not p:
            raise APIError("prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return [
            valid_text(x, f"prompt[{i}]", "prompt") if isinstance(x, str) else x
            for i, x in enumerate(p)
        ]

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise APIError("echo is not supported by this server", param="echo")
        if self.suffix:
            raise APIError("suffix is not supported by this server", param="suffix")
        if self.best_of not in (None, 1, self.n):
            raise APIError("best_of is not supported by this server", param="best_of")


# ------------------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # R1-style thinking (vLLM: "reasoning")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):  # a delta carries only what changed
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    """Also each streamed chunk (`text_completion` objects, as OpenAI streams them)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    max_model_len: int  # vLLM's field: the context (prompt + completion tokens)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
