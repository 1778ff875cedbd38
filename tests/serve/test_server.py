"""The OpenAI-compatible server on a free 127.0.0.1 port, driven by the real `openai` client
(chat, streaming, completions, n, seed, stop) and by raw httpx (errors, auth, disconnects)."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# ruff: noqa: E402
import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.detokenize import Detokenizer
from nanoseek.infer.engine import Delta
from nanoseek.serve.app import create_app
from nanoseek.serve.reasoning import split_reasoning
from nanoseek.serve.server import ServerThread

NAME = "tiny-r1"
MSGS = [{"role": "user", "content": "two plus two"}]
NO_EOS = {"ignore_eos": True}  # vLLM's extension: exactly max_tokens tokens


@pytest.fixture(scope="module")
def make_server(ckpt):
    """Start a server (own engine and model) with create_app options; stopped at the end."""
    servers = []

    def make(engine=None, **kw):
        tok = Tokenizer.load(ckpt)
        if engine is None:
            engine = Engine(nanoseek.load(ckpt), tok, max_batch_size=8, max_seq_len=256)
        kw.setdefault("disconnect_poll_s", 0.05)
        server = ServerThread(create_app(engine, tok, NAME, **kw)).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(ckpt):
    """What the engine alone produces (greedy), for comparing the server's answers with."""
    tok = Tokenizer.load(ckpt)
    engine = Engine(nanoseek.load(ckpt), tok, max_batch_size=1, max_seq_len=256)

    def text(prompt_ids, **kw):
        return engine.generate([prompt_ids], SamplingParams(**kw))[0]

    return SimpleNamespace(tok=tok, text=text)


def healthy(server) -> bool:
    r = httpx.get(server.url + "/health")
    return r.status_code == 200 and r.json() == {"status": "ok"}


def metrics(server) -> dict:
    return httpx.get(server.url + "/metrics").json()


# ------------------------------------------------------------------------------ openai client
def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_chat(client, reference):
    r = client.chat.completions.create(
        model=NAME, messages=MSGS, max_tokens=12, temperature=0, extra_body=NO_EOS
    )
    prompt = reference.tok.apply_chat_template(MSGS, add_generation_prompt=True)
    want = reference.text(prompt, max_new_tokens=12, ignore_eos=True)
    reasoning, content = split_reasoning(want.text, opened=True)  # the template opened <think>
    (choice,) = r.choices
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == (content or "")
    assert choice.message.model_extra["reasoning_content"] == reasoning
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 12)
    assert r.usage.total_tokens == len(prompt) + 12


def test_streaming_chat_matches_the_plain_response(client):
    kw = dict(model=NAME, messages=MSGS, max_tokens=10, temperature=0, extra_body=NO_EOS)
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    deltas = [c.choices[0].delta for c in body]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == (whole.choices[0].message.model_extra["reasoning_content"] or "")
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert len(body) > 3  # streamed token by token, not in one piece


def test_stream_ends_with_done(server):
    body = {"model": NAME, "messages": MSGS, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_completions(client, reference):
    r = client.completions.create(
        model=NAME, prompt="the cat", max_tokens=8, temperature=0, extra_body=NO_EOS
    )
    want = reference.text(
        reference.tok.encode("the cat", add_bos=True), max_new_tokens=8, ignore_eos=True
    )
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 8)
    # token-id prompts, several prompts at once, streaming
    ids = reference.tok.encode("the cat", add_bos=True)
    r2 = client.completions.create(
        model=NAME, prompt=[ids, ids], max_tokens=8, temperature=0, extra_body=NO_EOS
    )
    assert [c.text for c in r2.choices] == [want.text] * 2 and r2.usage.prompt_tokens == 6
    chunks = list(
        client.completions.create(
            model=NAME, prompt="the cat", max_tokens=8, temperature=0, extra_body=NO_EOS,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 8


def test_n_choices_and_seed(client):
    kw = dict(model=NAME, messages=MSGS, max_tokens=16, temperature=1.0, extra_body=NO_EOS)
    a = client.chat.completions.create(**kw, n=2, seed=7)
    b = client.chat.completions.create(**kw, n=2, seed=7)
    c = client.chat.completions.create(**kw, n=2, seed=8)

    def texts(r):
        return [ch.message.model_extra["reasoning_content"] for ch in r.choices]

    assert [ch.index for ch in a.choices] == [0, 1]
    assert texts(a) == texts(b)  # a seed reproduces
    assert texts(a)[0] != texts(a)[1]  # the n choices differ
    assert texts(a) != texts(c)
    assert a.usage.completion_tokens == 32
    # n streamed: chunks of both indices, each finishing once
    chunks = list(client.chat.completions.create(**kw, n=2, seed=7, stream=True))
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]
    for i in (0, 1):
        got = "".join(
            (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
            for c in chunks
            if c.choices[0].index == i
        )
        assert got == texts(a)[i]


def test_stop_strings(client):
    kw = dict(model=NAME, prompt="two plus", max_tokens=16, temperature=0, extra_body=NO_EOS)
    full = client.completions.create(**kw).choices[0].text
    stop = full[6:9]
    cut = full[: full.find(stop)]
    r = client.completions.create(**kw, stop=stop)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    r = client.completions.create(**kw, stop=["never appears", stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_concurrent_requests_are_batched(make_server):
    server = make_server()  # fresh counters

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        kw = dict(model=NAME, messages=MSGS, max_tokens=24, temperature=0, extra_body=NO_EOS)
        rs = await asyncio.gather(*(aclient.chat.completions.create(**kw) for _ in range(6)))
        await aclient.close()
        return rs

    rs = asyncio.run(main())
    # identical greedy requests give identical answers, batched or not
    assert len({r.choices[0].message.model_extra["reasoning_content"] for r in rs}) == 1
    m = metrics(server)
    assert m["requests_total"] == 6 and m["tokens_generated"] == 6 * 24
    assert m["max_batch_size_seen"] >= 3  # shared forwards, not one request at a time
    assert m["engine_steps"] < 6 * 24


# ------------------------------------------------------------------------------ errors
CHAT = {"model": NAME, "messages": MSGS, "max_tokens": 4}


@pytest.mark.parametrize(
    "path, body, status, code, param",
    [
        ("chat/completions", b'{"model": "tiny-r1", "messages": [', 400, "invalid_json", None),
        ("chat/completions", b"", 400, "invalid_json", None),
        ("chat/completions", b"[1, 2]", 400, "invalid_json", None),
        ("chat/completions", b"\xff\xfe", 400, "invalid_json", None),
        ("chat/completions", {**CHAT, "model": "gpt-9"}, 404, "model_not_found", "model"),
        ("chat/completions", {"messages": MSGS}, 400, "invalid_value", "model"),
        ("chat/completions", {**CHAT, "messages": []}, 400, "invalid_value", "messages"),
        (
            "chat/completions",
            {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
            400,
            "invalid_value",
            "messages",
        ),
        ("chat/completions", {**CHAT, "temperature": -1}, 400, "invalid_value", "temperature"),
        ("chat/completions", {**CHAT, "temperature": "hot"}, 400, "invalid_value", "temperature"),
        ("chat/completions", {**CHAT, "top_p": 2}, 400, "invalid_value", "top_p"),
        ("chat/completions", {**CHAT, "top_p": 0}, 400, "invalid_value", "top_p"),
        ("chat/completions", {**CHAT, "n": 0}, 400, "invalid_value", "n"),
        ("chat/completions", {**CHAT, "n": 1000}, 400, "invalid_value", "n"),
        ("chat/completions", {**CHAT, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ("chat/completions", {**CHAT, "stop": 5}, 400, "invalid_value", "stop"),
        ("chat/completions", {**CHAT, "stop": [""]}, 400, "invalid_value", "stop"),
        ("chat/completions", {**CHAT, "logprobs": True}, 400, "invalid_value", "logprobs"),
        # too many tokens: the completion, or the prompt alone, does not fit the context (256)
        (
            "chat/completions",
            {**CHAT, "max_tokens": 100_000},
            400,
            "context_length_exceeded",
            "max_tokens",
        ),
        (
            "chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "the cat sat " * 300}]},
            400,
            "context_length_exceeded",
            "messages",
        ),
        ("completions", {"model": NAME, "prompt": [[]]}, 400, "invalid_value", "prompt"),
        ("completions", {"model": NAME, "prompt": [99999]}, 400, "invalid_value", "prompt"),
        ("completions", {"model": NAME, "prompt": "x", "echo": True}, 400, "invalid_value", "echo"),
        ("nope", {}, 404, "not_found", None),
    ],
)
def test_bad_requests_are_json_errors_and_the_server_stays_healthy(
    server, path, body, status, code, param
):
    url = f"{server.url}/v1/{path}"
    r = httpx.post(url, json=body) if isinstance(body, dict) else httpx.post(url, content=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["code"] == code and err["param"] == param and err["message"]
    assert "Traceback" not in r.text
    assert healthy(server)


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=MSGS, temperature=-1)


def test_any_content_type_is_read_as_json(server):
    # curl -d sends application/x-www-form-urlencoded
    body = b'{"model": "tiny-r1", "prompt": "the", "max_tokens": 2}'
    r = httpx.post(
        server.url + "/v1/completions",
        content=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_api_key(make_server):
    server = make_server(api_key="sekrit")
    url = server.url + "/v1/models"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # checked before the body: a bad key with malformed JSON is still a 401
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{", headers={"x": "y"})
    assert r.status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer sekrit"}).status_code == 200
    assert healthy(server)  # /health needs no key
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="sekrit", max_retries=0)
    r = good.chat.completions.create(model=NAME, messages=MSGS, max_tokens=3)
    assert r.usage.completion_tokens <= 3


# ------------------------------------------------------------------------------ limits
def test_max_tokens_cap_and_too_many_pending(make_server):
    server = make_server(max_tokens=200, max_pending=2)
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, json={**CHAT, "max_tokens": 201})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "at most 200" in r.json()["error"]["message"]
    long = {**CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 2}
    with httpx.stream("POST", url, json=long) as held:  # 2 sequences in flight: full
        lines = held.iter_lines()  # keep the iterator: dropping it closes the connection
        next(lines)
        r = httpx.post(url, json=CHAT)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    # closing the stream aborted it: room again
    wait_for(lambda: metrics(server)["sequences_in_flight"] == 0)
    assert httpx.post(url, json=CHAT).status_code == 200


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_client_disconnect_aborts_the_request(make_server):
    server = make_server()
    body = {**CHAT, "max_tokens": 200, "ignore_eos": True}
    # a stream closed after two events
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={**body, "stream": True}
    ) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
    wait_for(lambda: metrics(server)["requests_aborted"] == 1)
    # a plain request whose client gives up (0.1 s: well before 200 tokens, even when fast)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.1)
    wait_for(lambda: metrics(server)["requests_aborted"] == 2)
    m = metrics(server)
    assert m["requests_running"] == 0 and m["sequences_in_flight"] == 0
    assert m["tokens_generated"] < 2 * 200  # stopped early
    assert healthy(server)


def test_an_engine_failure_is_a_500_and_the_server_recovers(ckpt, make_server):
    tok = Tokenizer.load(ckpt)
    engine = Engine(nanoseek.load(ckpt), tok, max_batch_size=4, max_seq_len=128)
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step()

    engine.step = flaky_step
    server = make_server(engine=engine)
    body = {**CHAT, "max_tokens": 8, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 500 and "Traceback" not in r.text
    assert r.json()["error"]["type"] == "server_error"
    assert healthy(server)
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert metrics(server)["engine_errors"] == 1


def test_an_unexpected_error_is_a_500_without_traceback(ckpt, make_server, monkeypatch):
    server = make_server()
    tok = server.server.config.app.state.server.tokenizer

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tok, "apply_chat_template", broken)
    r = httpx.post(server.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 500 and "a bug" not in r.text and "Traceback" not in r.text
    assert r.json()["error"]["code"] == "internal_error"
    assert healthy(server)


def test_content_parts_and_developer_role(client):
    parts = [{"type": "text", "text": "two "}, {"type": "text", "text": "plus two"}]
    kw = dict(model=NAME, max_tokens=2, temperature=0)
    a = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **kw)
    b = client.chat.completions.create(messages=MSGS, **kw)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    dev = [{"role": "developer", "content": "be brief"}, *MSGS]
    sys_ = [{"role": "system", "content": "be brief"}, *MSGS]
    c = client.chat.completions.create(messages=dev, **kw)
    d = client.chat.completions.create(messages=sys_, **kw)
    assert c.usage.prompt_tokens == d.usage.prompt_tokens > b.usage.prompt_tokens
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(openai.BadRequestError, match="only text"):
        client.chat.completions.create(messages=[{"role": "user", "content": image}], **kw)


# ------------------------------------------------------------------------------ reasoning split
class ScriptedEngine:
    """Engine stand-in whose every request writes the same text, one token per step: checks
    that R1-style output is split into reasoning_content and content over HTTP."""

    def __init__(self, tokenizer, script: str):
        self.tokenizer, self.script = tokenizer, tokenizer.encode(script)
        self.config = SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.max_seq_len, self.num_draft, self.max_batch_size = 256, 0, 8
        self.waiting, self.running, self._lock, self._batch = [], [], threading.Lock(), None

    def add_request(self, prompt, params, request_id):
        with self._lock:
            self.waiting.append([request_id, params, Detokenizer(self.tokenizer, params.stop), 0])

    def abort(self, request_id):
        with self._lock:
            self.waiting = [r for r in self.waiting if r[0] != request_id]
        self.running = [r for r in self.running if r[0] != request_id]

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def step(self):
        with self._lock:
            self.running += self.waiting
            self.waiting = []
        deltas = []
        for r in self.running:
            tok = self.script[r[3]]
            r[3] += 1
            d = Delta(r[0], [tok], r[2].add(tok))
            if r[3] == len(self.script) or r[3] == r[1].max_new_tokens:
                d.text += r[2].flush()
                d.finish_reason = "length"
            deltas.append(d)
        self.running = [
            r for r in self.running if r[3] < min(len(self.script), r[1].max_new_tokens)
        ]
        return deltas


def test_reasoning_content_is_separate_from_content(ckpt, make_server):
    tok = Tokenizer.load(ckpt)
    engine = ScriptedEngine(tok, "let me think</think>\n\nthe answer is 4")
    server = make_server(engine=engine)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    msg = client.chat.completions.create(model=NAME, messages=MSGS).choices[0].message
    assert msg.model_extra["reasoning_content"] == "let me think"
    assert msg.content == "the answer is 4"
    chunks = list(client.chat.completions.create(model=NAME, messages=MSGS, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    kinds = [
        "r" if (d.model_extra or {}).get("reasoning_content") else "c" if d.content else "-"
        for d in deltas
    ]
    assert "".join(k for k in kinds if k != "-").rstrip("c") == "r" * kinds.count("r")  # r, then c
    assert (
        "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        == "let me think"
    )
    assert "".join(d.content or "" for d in deltas) == "the answer is 4"
    # the thought is never fed back: history with reasoning_content is accepted and ignored
    history = [*MSGS, {"role": "assistant", "content": "4", "reasoning_content": "secret"}, *MSGS]
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": NAME, "messages": history, "max_tokens": 2},
    )
    assert r.status_code == 200
    plain = [*MSGS, {"role": "assistant", "content": "4"}, *MSGS]
    want = len(tok.apply_chat_template(plain, add_generation_prompt=True))
    assert r.json()["usage"]["prompt_tokens"] == want
    # completions are raw text: no split
    text = client.completions.create(model=NAME, prompt="x", max_tokens=50).choices[0].text
    assert text == "let me think</think>\n\nthe answer is 4"
