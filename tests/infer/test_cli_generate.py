"""`nanoseek generate`: streams the engine's text; user errors are one line."""

import pytest

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
from nanoseek.infer import Engine, SamplingParams
from tests.helpers import random_model, tiny_config

TEXTS = ["the cat sat on the mat", "two plus two is four", "<think>hmm</think> ok"] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, 300, tok_dir)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    extra = [tok_dir / "tokenizer.json", tok_dir / "tokenizer_config.json"]
    nanoseek.save(random_model(tiny_config(vocab_size=300)), path, extra_files=extra)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def expected_text(ckpt, prompt_ids, **kw):
    engine = Engine(nanoseek.load(ckpt), Tokenizer.load(ckpt), max_batch_size=1, max_seq_len=128)
    return engine.generate([prompt_ids], SamplingParams(**kw))[0].text


def test_streams_the_greedy_completion(capsys, ckpt):
    code, out, err = run(capsys, "generate", ckpt, "--prompt", "the cat", "--max-new-tokens", 12)
    assert code == 0, err
    tok = Tokenizer.load(ckpt)
    want = expected_text(ckpt, tok.encode("the cat", add_bos=True), max_new_tokens=12)
    assert out == want + "\n"
    assert "tokens/s" in err


def test_exact_decodes_as_an_exact_engine(capsys, ckpt):
    """--exact: PyTorch's operators only, the text of an exact engine (what evaluation gives)."""
    code, out, err = run(capsys, "generate", ckpt, "--prompt", "the cat", "--max-new-tokens", 12,
                         "--exact")  # fmt: skip
    assert code == 0, err
    tok = Tokenizer.load(ckpt)
    engine = Engine(nanoseek.load(ckpt), tok, max_batch_size=1, max_seq_len=128, exact=True)
    ids = tok.encode("the cat", add_bos=True)
    assert out == engine.generate([ids], SamplingParams(max_new_tokens=12))[0].text + "\n"


def test_chat_and_speculative(capsys, ckpt):
    argv = ["generate", ckpt, "--prompt", "hi", "--chat", "--max-new-tokens", 8, "--ignore-eos"]
    code, out, err = run(capsys, *argv, "--speculative", "mtp", "--num-draft", 2)
    assert code == 0, err
    assert out.startswith("<think>\n") and "MTP acceptance" in err
    code, plain, _ = run(capsys, *argv)
    assert plain == out  # greedy: speculative changes nothing
    code, int8_drafts, err = run(capsys, *argv, "--speculative", "mtp", "--draft-quantize", "int8")
    assert code == 0 and int8_drafts == plain, err  # nor do the drafts' weights


def test_sampling_with_a_seed_is_reproducible(capsys, ckpt):
    argv = ["generate", ckpt, "--prompt", "two", "--temperature", 1.0, "--top-p", 0.9, "--seed", 3]
    argv += ["--max-new-tokens", 12]
    assert run(capsys, *argv)[1] == run(capsys, *argv)[1]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--temperature", "-1"], ["temperature"]),
        (["--top-p", "0"], ["top_p"]),
        (["--max-new-tokens", "0"], ["max-new-tokens"]),
        (["--speculative", "eagle"], ["speculative"]),
        (["--speculative", "mtp", "--draft-quantize", "int4"], ["draft-quantize"]),
        (["--exact", "--quantize", "int8"], ["--exact", "--quantize"]),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, ckpt, extra, words):
    code, _, err = run(capsys, "generate", ckpt, "--prompt", "x", *extra)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanoseek: error: ")
    assert all(w in lines[0] for w in words)


def test_missing_checkpoint_or_tokenizer(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, "generate", tmp_path / "nope", "--prompt", "x")
    assert code == 2 and "no such checkpoint" in err
    bare = tmp_path / "bare"
    nanoseek.save(random_model(tiny_config(num_nextn_predict_layers=0, vocab_size=300)), bare)
    code, _, err = run(capsys, "generate", bare, "--prompt", "x")
    assert code == 2 and "tokenizer.json" in err
    argv = ["generate", bare, "--prompt", "x", "--tokenizer", ckpt, "--speculative", "mtp"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "MTP" in err
