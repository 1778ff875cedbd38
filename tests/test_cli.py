"""The `nanoseek` command line, in-process through `main(argv)` (plus one real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nanoseek import CausalLM, ModelConfig, load, save
from nanoseek.checkpoint.fp8_format import FP8_MAX
from nanoseek.cli import COMMANDS, main

INFO_KEYS = ("total_params", "active_params", "mtp_params", "kv_cache_bytes_per_token")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, argv: list[str], *words: str) -> None:
    """`nanoseek argv` exits 2 with one `nanoseek: error:` line naming `words`, no traceback."""
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanoseek: error: "), err
    for word in words:
        assert word in lines[0]


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny random bf16 checkpoint with a tokenizer file beside it."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny"))
    model.init_weights(std=0.1)  # wider than the default so FP8 rounding is visible
    save(model, tmp_path / "src", dtype=torch.bfloat16)
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    return tmp_path / "src"


# ------------------------------------------------------------------------------ info
def test_info_json_has_the_keys(capsys):
    code, out, _ = run(capsys, "info", "deepseek-v3", "--json")
    assert code == 0
    d = json.loads(out)
    for key in INFO_KEYS:
        assert isinstance(d[key], int)
    assert d["kv_cache_bytes_per_token"] == 70_272
    assert round(d["total_params"] / 1e9, 1) == 671.0


def test_info_table_and_seq_len(capsys):
    code, out, _ = run(capsys, "info", "tiny", "--seq-len", "128")
    assert code == 0
    assert "total (main model)" in out and "2,068,992" in out
    assert "context of 128 tokens" in out


def test_info_reads_a_checkpoint_dir(capsys, tmp_path):
    ModelConfig.from_preset("deepseek-v2-lite").save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json"):
        code, out, _ = run(capsys, "info", str(source), "--json")
        assert code == 0 and round(json.loads(out)["total_params"] / 1e9, 1) == 15.7


# ------------------------------------------------------------------------------ convert
def test_convert_bf16_fp8_bf16_round_trip(capsys, tiny_dir, tmp_path):
    fp8_dir, back_dir = tmp_path / "fp8", tmp_path / "back"
    code, out, _ = run(capsys, "convert", str(tiny_dir), str(fp8_dir), "--dtype", "fp8")
    assert code == 0 and "F8_E4M3" in out and "tensors" in out
    assert "quantised" in out and "done in" in out
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert (fp8_dir / "tokenizer_config.json").exists()
    code, out, _ = run(capsys, "convert", str(fp8_dir), str(back_dir), "--dtype", "bf16")
    assert code == 0 and "F8_E4M3" not in out and "dequantised" in out

    before = dict(load(tiny_dir).named_parameters())
    after = dict(load(back_dir).named_parameters())
    quantized = 0
    for name, w in before.items():
        w2 = after[name]
        if torch.equal(w, w2):
            continue  # embedding, head, norms, router stay bf16: bit-exact
        quantized += 1
        # e4m3 keeps 3 mantissa bits: relative rounding <= 2^-4, plus the subnormal step of a
        # block scaled to amax / 448
        bound = w.abs() * 2**-4 + w.abs().max() / FP8_MAX * 2**-9
        assert ((w - w2).abs() <= bound * 1.01).all(), name
    assert quantized > 0
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_convert_fp32(capsys, tiny_dir, tmp_path):
    code, out, _ = run(capsys, "convert", str(tiny_dir), str(tmp_path / "f32"), "--dtype", "fp32")
    assert code == 0 and "F32" in out
    a, b = load(tiny_dir), load(tmp_path / "f32")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_convert_refuses_to_replace_a_non_checkpoint(capsys, tiny_dir, tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert_user_error(capsys, ["convert", str(tiny_dir), str(other), "--dtype", "bf16"], "refusing")
    assert (other / "notes.txt").read_text() == "keep me"
    assert_user_error(
        capsys, ["convert", str(tiny_dir), str(tiny_dir), "--dtype", "bf16"], "differ"
    )


# ------------------------------------------------------------------------------ demo
def test_demo(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    assert "identical" in out and "demo passed" in out and "model.safetensors" in out
    assert (tmp_path / "demo" / "config.json").exists()


# ------------------------------------------------------------------------------ errors
def test_missing_directory(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    assert_user_error(capsys, ["info", missing], "nope")
    assert_user_error(capsys, ["convert", missing, str(tmp_path / "o"), "--dtype", "bf16"])


def test_bad_config_value_names_the_field(capsys, tmp_path):
    d = ModelConfig.from_preset("tiny").to_dict()
    d["n_routed_experts"] = 9  # n_group = 2
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert_user_error(capsys, ["info", str(tmp_path)], "n_routed_experts", "config.json")
    convert = ["convert", str(tmp_path), str(tmp_path / "o"), "--dtype", "fp8"]
    assert_user_error(capsys, convert, "n_routed_experts")


def test_bad_json_and_bad_arguments(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_user_error(capsys, ["info", str(tmp_path)], "JSON")
    assert_user_error(capsys, ["info", "tiny", "--seq-len", "0"], "--seq-len")
    assert_user_error(capsys, ["convert", "a", "b", "--dtype", "int4"], "int4")
    assert_user_error(capsys, ["frobnicate"], "frobnicate")
    assert_user_error(capsys, [])  # no subcommand


def test_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in COMMANDS:
        assert cmd.name in out


def test_python_dash_m(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "nanoseek", "info", "tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "total (main model)" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "nanoseek", "info", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
