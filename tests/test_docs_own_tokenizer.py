"""docs/own_tokenizer_and_data.md, run as written: the `nanoseek ...` commands of its bash blocks
on a ChatML tokenizer and tiny generated files (a tiny model and a few steps appended to each),
then the loaded model's stop tokens, its chat session and the engine's end-of-turn stop."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from nanoseek.cli import main
from nanoseek.data.tokenizer import Tokenizer
from tests.helpers import tiny_config
from tests.hf_tokenizers import build, corpus

DOC = Path(__file__).resolve().parents[1] / "docs" / "own_tokenizer_and_data.md"
TINY = {  # appended to each documented command: same path, tiny settings
    "pretrain": ["--model=tiny.json", "--max_steps=3", "--seq_len=64", "--batch_size=2",
                 "--precision=fp32", "--plot=false", "--val_fraction=0", "--eval_every=0",
                 "--save_every=100", "--warmup_steps=1"],
    "sft": ["--max_steps=2", "--seq_len=64", "--batch_size=2", "--precision=fp32",
            "--plot=false", "--val_fraction=0"],
    "eval": ["--n", "2", "--k", "1", "--max-new-tokens", "6", "--json"],
    "generate": ["--max-new-tokens", "6"],
}  # fmt: skip


def documented_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("nanoseek ")]


def write_files(root: Path) -> None:
    """The page's three data files, small: corpus.txt, chat.jsonl, task.jsonl."""
    pairs = [(a, b) for a in range(1, 9) for b in range(1, 9)]
    qa = [(f"What is {a} plus {b}?", f"{a} + {b} = {a + b}", str(a + b)) for a, b in pairs]
    docs = corpus(60) + [f"{q} {s}" for q, s, _ in qa]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    with open(root / "chat.jsonl", "w", encoding="utf-8") as f:
        for q, s, _ in qa[:24]:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": s}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with open(root / "task.jsonl", "w", encoding="utf-8") as f:
        for q, s, a in qa:
            f.write(json.dumps({"question": q, "answer": a, "solution": s}) + "\n")


def test_the_page_documents_each_stage():
    names = [c[0] for c in documented_commands()]
    assert names == ["pretrain", "sft", "eval", "generate"]
    text = DOC.read_text(encoding="utf-8")
    assert "nanoseek serve" in text and "nanoseek grpo" in text and "--tokenizer=" in text


def test_documented_path_runs_with_a_chatml_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    build("chatml", tmp_path / "my_tokenizer")
    write_files(tmp_path)
    tiny_config(num_hidden_layers=2, max_position_embeddings=128).save_pretrained(tmp_path)
    (tmp_path / "config.json").rename(tmp_path / "tiny.json")
    outputs = {}
    for argv in documented_commands():
        assert main([*argv, *TINY[argv[0]]]) == 0, argv
        outputs[argv[0]] = capsys.readouterr()

    tok = Tokenizer.load("my_tokenizer")
    base = Path("runs/byo/base/model")
    config = json.loads((base / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    model_dir = Path("runs/byo/sft/model")
    again = Tokenizer.load(model_dir)  # the tokenizer travels with every model directory
    assert again.special_tokens == tok.special_tokens and again.chat_template == tok.chat_template
    im_end = tok.token_to_id("<|im_end|>")
    assert again.stop_ids == (tok.eos_id, im_end)

    result = json.loads(outputs["eval"].out)
    assert result["n_problems"] == 2
    printed = outputs["generate"].out
    assert "<|im_start|>" not in printed and "What is 7 plus 8?" not in printed  # no echo
    assert "tokens in" in outputs["generate"].err

    # chat and serve load the same directory: the engine stops on <|im_end|> as on eos
    from nanoseek.infer import SamplingParams
    from nanoseek.serve.chat import ChatSession
    from nanoseek.serve.loading import load_engine

    engine, loaded = load_engine(str(model_dir), max_seq_len=128)
    assert {tok.eos_id, im_end} <= engine.eos_ids
    session = ChatSession(engine, loaded, SamplingParams(max_new_tokens=4, temperature=0.0))
    parts = list(session.reply("What is 2 plus 3?"))
    assert session.history[0] == {"role": "user", "content": "What is 2 plus 3?"}
    assert all("<|im_start|>" not in p.content for p in parts)


def test_engine_stops_on_an_end_of_turn_token_and_leaves_out_its_text(tmp_path):
    """Whatever the token: make the model's first greedy token the end of turn."""
    from nanoseek.infer import Engine, SamplingParams
    from tests.helpers import random_model

    tok = Tokenizer.load(build("llama3", tmp_path / "t"))
    model = random_model(tiny_config(vocab_size=tok.vocab_size))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    free = Engine(model, max_batch_size=1, max_seq_len=64)
    first = free.generate([prompt], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    t = first.token_ids[0]

    class EndsOn:  # the tokenizer, with `t` as its end-of-turn token
        stop_ids = (tok.eos_id, t)

        def __getattr__(self, name):
            return getattr(tok, name)

    done = Engine(model, EndsOn(), max_batch_size=1, max_seq_len=64).generate(
        [prompt], SamplingParams(max_new_tokens=3)
    )[0]
    assert done.token_ids == [t] and done.finish_reason == "stop" and done.text == ""
