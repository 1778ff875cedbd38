"""Model directories are validated before use: every bad value is one error naming the file and
the field or tensor, through the CLI as `nanoseek: error: ...` with exit code 2."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError, ConfigError
from nanoseek.checkpoint import io
from nanoseek.cli import main
from nanoseek.data.tokenizer import CHAT_TEMPLATE, Tokenizer, train_tokenizer
from tests.helpers import random_model, tiny_config

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "model"
    nanoseek.save(random_model(tiny_config(), seed=3), d)
    return d


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of the saved checkpoint to spoil."""
    d = tmp_path / "model"
    d.mkdir()
    for name in os.listdir(saved):
        (d / name).write_bytes((saved / name).read_bytes())
    return d


def edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))  # NaN/Infinity as JSON spells them


def one_line_cli_error(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek: error: ") and "\n" not in err, err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("torch_dtype", "int7", "must be one of"),
        ("rope_theta", float("nan"), "finite number"),
        ("routed_scaling_factor", float("inf"), "finite number"),
        ("rms_norm_eps", "1e-6", "finite number"),
        ("rms_norm_eps", 0, "> 0"),
        ("initializer_range", -0.1, ">= 0"),
        ("eos_token_id", 97, "vocab_size=97"),
        ("eos_token_id", [1, 500], "vocab_size=97"),
        ("bos_token_id", -1, "vocab_size=97"),
        ("pad_token_id", "2", "token id"),
        ("tie_word_embeddings", "no", "true or false"),
        ("num_nextn_predict_layers", "1", "integer"),
        ("rope_scaling", {"type": "yarn", "factor": "4", "original_max_position_embeddings": 64},
         "'factor' must be a finite number"),
    ],
)  # fmt: skip
def test_bad_config_field_is_one_line_naming_file_and_field(ckpt, capsys, field, value, why):
    edit_config(ckpt, **{field: value})
    with pytest.raises(ConfigError) as info:
        nanoseek.load(ckpt)
    msg = str(info.value)
    assert str(ckpt / "config.json") in msg and f"'{field}'" in msg and why in msg, msg
    one_line_cli_error(capsys, ["info", str(ckpt)], ckpt / "config.json", field)


def test_known_dtypes_and_token_list_are_accepted(ckpt):
    edit_config(ckpt, torch_dtype="float16", eos_token_id=[1, 96], rope_theta=10000)
    assert nanoseek.load(ckpt).config.eos_token_id == [1, 96]


def test_config_not_utf8_or_not_json(ckpt, capsys):
    (ckpt / "config.json").write_bytes(b'{"vocab_size": "\xff\xfe"}')
    one_line_cli_error(capsys, ["info", str(ckpt)], ckpt / "config.json", "not UTF-8")
    (ckpt / "config.json").write_text('{"vocab_size": ')
    one_line_cli_error(capsys, ["info", str(ckpt)], ckpt / "config.json", "not valid JSON")
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_cli_error(capsys, ["info", str(ckpt)], ckpt / "config.json")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entries_must_stay_inside_the_directory(ckpt, name):
    key = next(iter(load_file(ckpt / "model.safetensors")))
    index = {"metadata": {}, "weight_map": {key: name}}
    (ckpt / INDEX).write_text(json.dumps(index))
    opened = []
    real_open = io._open
    io_open = lambda path: opened.append(path) or real_open(path)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io, "_open", io_open)
        with pytest.raises(CheckpointError, match="outside the model directory") as info:
            nanoseek.load(ckpt)
    assert str(ckpt / INDEX) in str(info.value) and key in str(info.value)
    assert opened == []  # refused before any file was opened


def test_index_entry_through_a_symlink_out_of_the_directory(ckpt, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((ckpt / "model.safetensors").read_bytes())
    os.symlink(outside, ckpt / "link.safetensors")
    wm = dict.fromkeys(load_file(ckpt / "model.safetensors"), "link.safetensors")
    (ckpt / INDEX).write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        nanoseek.load(ckpt)


def spoil_tensor(d, fn):
    """Replace the first 2-D weight in model.safetensors by fn(it); returns its name."""
    tensors = load_file(d / "model.safetensors")
    key = next(k for k, t in tensors.items() if t.dim() == 2)
    tensors[key] = fn(tensors[key])
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return key


def test_integer_weights_are_refused(ckpt, capsys):
    key = spoil_tensor(ckpt, lambda t: (t * 100).to(torch.int32))
    with pytest.raises(CheckpointError, match="not a float dtype") as info:
        nanoseek.load(ckpt)
    assert key in str(info.value) and str(ckpt / "model.safetensors") in str(info.value)


def test_nan_weights_found_on_load_of_a_small_model_and_by_info_scan(ckpt, capsys):
    def nan(t):
        t = t.clone()
        t[0, 0] = float("nan")
        t[1, 1] = float("inf")
        return t

    key = spoil_tensor(ckpt, nan)
    with pytest.raises(CheckpointError, match="2 NaN or infinite values") as info:
        nanoseek.load(ckpt)
    assert key in str(info.value)
    nanoseek.load(ckpt, check_finite=False)  # the scan can be switched off for a huge model
    one_line_cli_error(capsys, ["info", str(ckpt), "--scan"], key, "NaN or infinite")


def test_info_scan_of_an_intact_checkpoint(saved, capsys):
    assert main(["info", str(saved), "--scan"]) == 0
    assert "all finite" in capsys.readouterr().err


# ------------------------------------------------------------------------ tokenizer files
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(["hello world, 12 + 30 = 42"] * 20, 300, d)
    return d


@pytest.fixture
def tok(tok_dir, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    for name in os.listdir(tok_dir):
        (d / name).write_bytes((tok_dir / name).read_bytes())
    return d


@pytest.mark.parametrize(
    ("content", "why"),
    [(b'{"chat_template": "\xff"}', "not UTF-8"), (b'{"chat_template": ', "not valid JSON"),
     (b"[1, 2]", "expected a JSON object")],
)  # fmt: skip
def test_tokenizer_config_unreadable(tok, content, why):
    (tok / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=why) as info:
        Tokenizer.load(tok)
    assert str(tok / "tokenizer_config.json") in str(info.value)


@pytest.mark.parametrize(
    "template", ["{% for m in messages %}{{ m['content'] }", "{{ messages | nosuchfilter }}", 42]
)
def test_broken_chat_template_names_file_and_field(tok, template):
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        Tokenizer.load(tok)
    msg = str(info.value)
    assert str(tok / "tokenizer_config.json") in msg and "'chat_template'" in msg, msg
    assert "\n" not in msg


def test_corrupt_tokenizer_json_names_the_file(tok):
    (tok / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ConfigError, match="not a valid tokenizer") as info:
        Tokenizer.load(tok)
    assert str(tok / "tokenizer.json") in str(info.value)


def test_good_tokenizer_still_loads(tok):
    assert Tokenizer.load(tok).chat_template == CHAT_TEMPLATE
