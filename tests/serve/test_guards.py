"""Hostile and unlucky requests: oversized bodies (413 before they are read), lone surrogates,
deep nesting and out-of-range numbers (400, never a 500), templating off the event loop, the
key guarding every route but /health, and the warning for a keyless non-local server."""

import json
import socket
import threading

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# ruff: noqa: E402
import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine
from nanoseek.serve.app import create_app
from nanoseek.serve.guards import DEFAULT_MAX_REQUEST_BYTES, exposure_warning, is_local
from nanoseek.serve.server import ServerThread

NAME = "tiny-r1"
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": NAME, "prompt": "the", "max_tokens": 2}
LIMIT = 4096  # the small-limit server's


@pytest.fixture(scope="module")
def make_server(ckpt):
    """Start a server with create_app options (and optionally its own tokenizer)."""
    servers = []

    def make(tokenizer=None, **kw):
        tok = Tokenizer.load(ckpt)
        engine = Engine(nanoseek.load(ckpt), tok, max_batch_size=4, max_seq_len=128)
        server = ServerThread(create_app(engine, tokenizer or tok, NAME, **kw)).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def small(make_server):
    return make_server(max_request_bytes=LIMIT)


def post(server, path: str, body) -> httpx.Response:
    url = f"{server.url}/v1/{path}"
    if isinstance(body, dict):
        return httpx.post(url, json=body, timeout=60)
    return httpx.post(url, content=body, timeout=60)


def refused(r: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    """An OpenAI-style one-line error with this status (and param, code)."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["message"]
    assert "\n" not in err["message"] and "Traceback" not in r.text
    assert err["param"] == param
    if code:
        assert err["code"] == code
    return err


def healthy(server) -> bool:
    return httpx.get(server.url + "/health").json() == {"status": "ok"}


def raw_exchange(server, request: bytes, timeout: float = 20.0) -> tuple[int, dict]:
    """Send raw bytes, read one response (status, JSON body). The body of the request may be
    unfinished: the response must come without it."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed early: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(body) < int(headers["content-length"]):
            body += s.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


# ------------------------------------------------------------------------------ body size
def test_a_body_over_the_limit_is_413_before_it_is_read(small):
    # 20 MB announced, nothing sent: the answer comes from the header alone
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 20000000\r\n\r\n"
    )
    status, body = raw_exchange(small, head)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "20000000" in body["error"]["message"] and str(LIMIT) in body["error"]["message"]
    assert healthy(small)


def test_a_chunked_body_is_413_as_soon_as_it_passes_the_limit(small):
    # no Content-Length: the limit is counted while reading; the body is never finished
    chunk = b" " * (LIMIT + 1)
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n"
    )
    status, body = raw_exchange(small, head)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert healthy(small)


def test_an_oversized_body_sent_whole_gets_413_and_the_connection_survives(small):
    big = json.dumps({**CHAT, "pad": "x" * 20 * LIMIT}).encode()
    with httpx.Client(base_url=small.url + "/v1", timeout=60) as client:
        refused(client.post("/chat/completions", content=big), 413, code="request_too_large")

        def chunks():  # a generator: httpx sends it chunked, without Content-Length
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        refused(client.post("/completions", content=chunks()), 413, code="request_too_large")
        # the same keep-alive connection serves the next request
        assert client.post("/completions", json=COMPLETION).status_code == 200


def test_a_body_at_the_limit_is_served(small):
    body = json.dumps(COMPLETION).encode()
    exact = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    assert len(exact) == LIMIT
    assert post(small, "completions", exact).status_code == 200
    refused(post(small, "completions", exact + b" "), 413, code="request_too_large")


def test_the_default_limit_is_1_mib(server):
    assert DEFAULT_MAX_REQUEST_BYTES == 1 << 20
    big = json.dumps({**CHAT, "pad": "x" * (1 << 20)}).encode()
    refused(post(server, "chat/completions", big), 413, code="request_too_large")


# ------------------------------------------------------------------------------ 400, never 500
SURROGATE = '"\\ud800"'  # JSON's spelling of a lone surrogate: json.loads accepts it


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "chat/completions",
            '{"model": "tiny-r1", "messages": [{"role": "user", "content": %s}]}',
            "messages",
        ),
        (
            "chat/completions",
            '{"model": "tiny-r1", "messages": [{"role": "user", '
            '"content": [{"type": "text", "text": %s}]}]}',
            "messages",
        ),
        (
            "chat/completions",
            '{"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "stop": [%s]}',
            "stop",
        ),  # fmt: skip
        ("completions", '{"model": "tiny-r1", "prompt": %s}', "prompt"),
        ("completions", '{"model": "tiny-r1", "prompt": ["ok", %s]}', "prompt"),
        ("completions", '{"model": %s, "prompt": "the"}', "model"),  # 404, quoted escaped
    ],
)
def test_a_lone_surrogate_is_a_400(server, path, body, param):
    r = post(server, path, (body % SURROGATE).encode())
    err = refused(r, 404 if param == "model" else 400, param)
    assert "ud800" in err["message"]
    assert healthy(server)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100_000, 5000, 990])
@pytest.mark.parametrize("field", ["messages", "logprobs", "metadata", "response_format"])
def test_deep_nesting_is_never_a_500(server, depth, field):
    value = nested(depth) if field != "response_format" else f'{{"a": {nested(depth)}}}'
    body = json.dumps(CHAT)[:-1] + f', "{field}": {value}}}'
    r = post(server, "chat/completions", body.encode())
    # deep enough to defeat the parser: invalid JSON; else a bad field, or an ignored one
    assert r.status_code in (200, 400), r.text
    if depth >= 5000:
        refused(r, 400, code="invalid_json")
    assert healthy(server)


def test_a_deeply_nested_body_is_a_400(server):
    refused(post(server, "completions", nested(100_000).encode()), 400, code="invalid_json")


@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1, 10**30])
def test_a_seed_beyond_64_bits_is_a_400_naming_seed(server, seed):
    err = refused(post(server, "completions", {**COMPLETION, "seed": seed}), 400, "seed")
    assert err["message"].startswith("seed:")


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0])
def test_seeds_at_the_64_bit_edges_are_served(server, seed):
    r = post(server, "completions", {**COMPLETION, "seed": seed, "n": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 2**70},  # once overflowed the engine's tensor, failing the whole batch
        {"top_k": 10**6},
        {"max_tokens": 2**70},
        {"temperature": 1e308},
        {"n": 2**70},
        {"prompt": [2**70]},
        {"prompt": [-1]},
        {"prompt": "9" * 5000},
    ],
)
def test_out_of_range_numbers_are_4xx_and_the_server_stays_up(server, extra):
    r = post(server, "completions", {**COMPLETION, **extra})
    assert r.status_code in (200, 400), r.text
    assert healthy(server)
    assert post(server, "completions", COMPLETION).status_code == 200


def test_a_huge_integer_literal_is_a_400(server):
    body = json.dumps(COMPLETION)[:-1] + ', "seed": ' + "9" * 5000 + "}"
    refused(post(server, "completions", body.encode()), 400, code="invalid_json")


# ------------------------------------------------------------------------------ event loop
class BlockingTokenizer:
    """The real tokenizer, whose `encode` of a text holding BLOCK waits until released, and
    records the thread it ran on."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.threads = tok, []
        self.started, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text: str, **kw):
        if "BLOCK" in text:
            self.threads.append(threading.get_ident())
            self.started.set()
            self.release.wait(60)
        return self.tok.encode(text, **kw)


@pytest.mark.parametrize(
    "path, body",
    [
        ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "BLOCK"}]}),
        ("completions", {**COMPLETION, "prompt": "BLOCK"}),
    ],
)
def test_tokenising_does_not_block_the_event_loop(make_server, ckpt, path, body):
    tok = BlockingTokenizer(Tokenizer.load(ckpt))
    server = make_server(tokenizer=tok)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=post(server, path, body)))
    t.start()
    try:
        assert tok.started.wait(60)
        # the tokenizer is stuck: were it on the event loop, /health would hang until released
        assert httpx.get(server.url + "/health", timeout=15).status_code == 200
        assert tok.threads[0] != server.thread.ident
    finally:
        tok.release.set()
        t.join(60)
    assert result["r"].status_code == 200, result["r"].text


# ------------------------------------------------------------------------------ the key
def test_the_key_guards_every_route_but_health(make_server):
    server = make_server(api_key="sekrit")
    key = {"Authorization": "Bearer sekrit"}
    for path in ("/metrics", "/openapi.json", "/v1/models", "/nowhere"):
        refused(httpx.get(server.url + path), 401, code="invalid_api_key")
        refused(
            httpx.get(server.url + path, headers={"Authorization": "Bearer nope"}),
            401,
            code="invalid_api_key",
        )
    assert httpx.get(server.url + "/metrics", headers=key).json()["model"] == NAME
    assert httpx.get(server.url + "/openapi.json", headers=key).status_code == 200
    assert httpx.get(server.url + "/nowhere", headers=key).status_code == 404
    assert healthy(server)  # a load balancer's probe needs no key


def test_without_a_key_metrics_are_open(server):
    assert httpx.get(server.url + "/metrics").json()["model"] == NAME


# ------------------------------------------------------------------------------ start-up
@pytest.mark.parametrize(
    "host, local",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.com", False),
    ],
)
def test_is_local(host, local):
    assert is_local(host) is local
    warning = exposure_warning(host, None)
    assert (warning is None) is local
    assert exposure_warning(host, "k") is None
    if warning:
        assert "\n" not in warning and host in warning and "--api-key" in warning


def test_serve_warns_when_listening_beyond_this_machine_without_a_key(ckpt, capsys, monkeypatch):
    import nanoseek.serve.server as server_module

    apps = []

    def fake_serve(app, sock, log_level="info"):  # record the app instead of serving it
        apps.append(app)
        sock.close()

    monkeypatch.setattr(server_module, "serve", fake_serve)
    args = ["serve", str(ckpt), "--port", "0", "--max-request-bytes", "1234"]
    assert main([*args, "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "--api-key" in warnings[0]
    assert apps[-1].state.max_request_bytes == 1234
    for extra in (["--host", "0.0.0.0", "--api-key", "k"], ["--host", "127.0.0.1"]):
        assert main([*args, *extra]) == 0
        assert "warning" not in capsys.readouterr().err
    assert len(apps) == 3


def test_more_prompts_than_the_server_holds_is_a_400(server):
    # ~100k one-token prompts fit the body limit; they are refused before any is tokenised
    err = refused(
        post(server, "completions", {**COMPLETION, "prompt": [[0]] * 100_000}), 400, "prompt"
    )
    assert "100000 sequences" in err["message"]
