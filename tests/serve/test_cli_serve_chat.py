"""`nanoseek chat` through a pipe and `nanoseek serve` as a process; the chat session's parts."""

import io
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.engine import Delta
from nanoseek.serve.chat import DIM, ChatSession, run_chat
from nanoseek.serve.reasoning import split_reasoning

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nanoseek_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "nanoseek", *map(str, args)]


# ------------------------------------------------------------------------------ chat
def test_chat_through_a_pipe(ckpt, capsys, monkeypatch):
    lines = "two plus two\n\n/reset\nthe cat\n/exit\nnever read\n"
    r, w = os.pipe()  # stdin is a real pipe, not a terminal: line by line, no prompt, no colour
    os.write(w, lines.encode())
    os.close(w)
    with open(r) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        code = main(["chat", str(ckpt), "--max-new-tokens", "8", "--temperature", "0"])
    p = SimpleNamespace(returncode=code, **dict(zip(("stdout", "stderr"), capsys.readouterr())))
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert len(out) == 3 and out[1] == "(conversation reset)", p.stdout
    assert "\033[" not in p.stdout  # no colours in a pipe: the parts are labelled instead
    # the first reply is the engine's greedy answer, thinking labelled as such
    tok = Tokenizer.load(ckpt)
    engine = Engine(nanoseek.load(ckpt), tok, max_batch_size=1, max_seq_len=256)
    msgs = [{"role": "user", "content": "two plus two"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    text = engine.generate([ids], SamplingParams(max_new_tokens=8))[0].text
    reasoning, content = split_reasoning(text, opened=True)
    want = (f"[thinking] {reasoning}" if reasoning else "") + (
        f"{chr(10) if reasoning else ''}[answer] {content}" if content else ""
    )
    assert p.stdout.startswith(want or "[answer] ")


def test_engine_options_exact(ckpt):
    """chat / serve --exact: an exact engine (PyTorch's operators only); with --quantize a
    one-line error naming both, before the weights load."""
    from nanoseek.serve.loading import load_engine

    engine, _ = load_engine(str(ckpt), max_batch_size=1, exact=True)
    assert engine.runner.weights.exact
    with pytest.raises(ValueError, match="--exact.*--quantize"):
        load_engine(str(ckpt), exact=True, quantize="int8")


class FakeEngine:
    """Streams a fixed text in small pieces; records the prompts it was given."""

    def __init__(self, text: str, max_seq_len: int = 4096):
        self.text, self.max_seq_len, self.num_draft = text, max_seq_len, 0
        self.prompts = []

    def stream(self, prompts, params):
        self.prompts.append(prompts[0])
        pieces = [self.text[i : i + 3] for i in range(0, len(self.text), 3)]
        for j, piece in enumerate(pieces):
            last = j == len(pieces) - 1
            yield Delta("r", [5], piece, finish_reason="stop" if last else None)


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.load(ckpt)


def chat(session, text: str, color: bool) -> str:
    out = io.StringIO()
    assert run_chat(session, io.StringIO(text), out, io.StringIO(), color=color) == 0
    return out.getvalue()


def test_thinking_is_shown_apart_and_kept_out_of_the_history(tok):
    engine = FakeEngine("I should add.</think>\n\nIt is 4.")
    session = ChatSession(engine, tok, SamplingParams(max_new_tokens=50))
    out = chat(session, "2+2?\n", color=False)
    assert out == "[thinking] I should add.\n[answer] It is 4.\n"
    assert session.history == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    out = chat(session, "again\n", color=True)
    assert DIM + "I s" in out and out.endswith("\n\nIt is 4.\n")
    # the second prompt holds the first answer but not its thought
    assert "It is 4." in tok.decode(engine.prompts[1])
    assert "I should add" not in tok.decode(engine.prompts[1])
    chat(session, "/reset\nhi\n", color=False)
    assert len(session.history) == 2


def test_old_turns_are_dropped_when_the_context_is_full(tok):
    engine = FakeEngine("ok</think>fine " * 5)
    session = ChatSession(engine, tok, SamplingParams(max_new_tokens=16))
    one_turn = len(
        tok.apply_chat_template(
            [{"role": "user", "content": "the cat sat"}], add_generation_prompt=True
        )
    )
    engine.max_seq_len = one_turn + 60  # room for a turn or two of history
    chat(session, "the cat sat\n" * 6, color=False)
    assert len(session.history) < 12
    assert all(len(p) + 16 <= engine.max_seq_len for p in engine.prompts)
    # a message longer than the whole context is an error, not a crash
    err = io.StringIO()
    run_chat(session, io.StringIO("the cat sat " * 100 + "\n"), io.StringIO(), err, color=False)
    assert err.getvalue().startswith("error: ")


# ------------------------------------------------------------------------------ serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process(ckpt):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    port = free_port()
    cmd = nanoseek_cmd("serve", ckpt, "--port", port, "--api-key", "k", "--log-level", "warning")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(url + "/v1/models", headers=headers).json()
        assert models["data"][0]["id"] == "tiny-r1"  # the directory's name
        body = {
            "model": "tiny-r1",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
        }
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: graceful shutdown, exit code 0
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "serving 'tiny-r1' at http://127.0.0.1" in err and "Traceback" not in err


def test_serve_user_errors_are_one_line(capsys, ckpt, tmp_path):
    pytest.importorskip("fastapi")
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code = main(["serve", str(ckpt), "--port", str(s.getsockname()[1])])
    err = capsys.readouterr().err
    assert code == 2 and "cannot listen on 127.0.0.1" in err and len(err.strip().splitlines()) == 1
    assert main(["chat", str(ckpt), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
