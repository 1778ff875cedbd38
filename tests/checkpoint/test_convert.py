"""The streaming converter: bit-identical to save(fp8=True) + load, the release layout, shards and
index, files carried along, FP8 scales found in other shards, and bad input."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError
from nanoseek.checkpoint.convert import convert_checkpoint
from nanoseek.checkpoint.fp8_format import QUANTIZATION_CONFIG, is_quantized_key
from nanoseek.checkpoint.keys import hf_state_items
from tests.helpers import random_model, tiny_config

FP8 = torch.float8_e4m3fn
INDEX = "model.safetensors.index.json"
SHARD = 60_000  # bytes: the ragged model below is ~0.9 MB in bf16, so a dozen shards or more


def ragged_config():
    """hidden 200, intermediate 300, kv_lora 312: every FP8 weight has partial edge blocks, and
    kv_a_proj_with_mqa [320, 200] has three row blocks, the last one 64 rows."""
    return tiny_config(
        vocab_size=50,
        hidden_size=200,
        intermediate_size=300,
        moe_intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=100,
        kv_lora_rank=312,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
    )


def file_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, bit for bit, float8 included (no float8 kernels for equal on CPU)."""
    if a.dtype in (FP8, torch.float8_e5m2) or b.dtype in (FP8, torch.float8_e5m2):
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.fixture
def src(tmp_path):
    """A ragged random model saved in bf16 as several shards, with a tokenizer beside it."""
    d = tmp_path / "src"
    nanoseek.save(random_model(ragged_config()), d, dtype=torch.bfloat16, max_shard_bytes=SHARD)
    (d / "tokenizer.json").write_text('{"model": "bpe"}')
    return d


# ------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("target", ["bf16", "fp32"])
def test_round_trip_equals_save_fp8_then_load(src, tmp_path, target):
    fp8_dir, back = tmp_path / "fp8", tmp_path / "back"
    convert_checkpoint(src, fp8_dir, "fp8", max_shard_bytes=SHARD)
    # the reference: the same bf16 weights through save(fp8=True), then load
    ref = tmp_path / "ref"
    nanoseek.save(nanoseek.load(src, dtype=torch.bfloat16), ref, fp8=True)
    got_fp8, want_fp8 = file_tensors(fp8_dir), file_tensors(ref)
    assert got_fp8.keys() == want_fp8.keys()
    for key, t in want_fp8.items():
        assert same(got_fp8[key], t), key

    stats = convert_checkpoint(fp8_dir, back, target, max_shard_bytes=SHARD)
    dtype = torch.bfloat16 if target == "bf16" else torch.float32
    want = dict(hf_state_items(nanoseek.load(ref, dtype=dtype)))
    got = file_tensors(back)
    assert got.keys() == want.keys()  # no scales left
    for key, t in got.items():
        assert same(t, want[key]), key
    assert stats["dequantized"] == sum(k.endswith("_scale_inv") for k in got_fp8) > 0
    config = json.loads((back / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == ("bfloat16" if target == "bf16" else "float32")


def test_fp8_to_fp8_and_bf16_to_bf16_are_lossless(src, tmp_path):
    convert_checkpoint(src, tmp_path / "a", "fp8", max_shard_bytes=SHARD)
    convert_checkpoint(tmp_path / "a", tmp_path / "b", "fp8")  # one file now
    a, b = file_tensors(tmp_path / "a"), file_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    convert_checkpoint(src, tmp_path / "c", "bf16")
    s, c = file_tensors(src), file_tensors(tmp_path / "c")
    assert s.keys() == c.keys() and all(same(s[k], c[k]) for k in s)


def test_fp32_source_to_fp8_stores_the_rest_in_bf16(tmp_path):
    model = random_model(ragged_config())
    nanoseek.save(model, tmp_path / "f32")  # fp32
    stats = convert_checkpoint(tmp_path / "f32", tmp_path / "fp8", "fp8")
    stored = file_tensors(tmp_path / "fp8")
    for key, t in hf_state_items(model):
        if key.endswith("e_score_correction_bias"):
            assert stored[key].dtype == torch.float32 and torch.equal(stored[key], t), key
        elif not is_quantized_key(key):
            assert same(stored[key], t.bfloat16()), key
    assert stats["quantized"] == sum(is_quantized_key(k) for k in stored)
    assert set(stats["dtypes"]) == {"BF16", "F32", "F8_E4M3"}


# ------------------------------------------------------------------------------- layout
def test_fp8_layout_shards_and_index(src, tmp_path):
    d = tmp_path / "fp8"
    seen = []
    stats = convert_checkpoint(
        src, d, "fp8", max_shard_bytes=SHARD, progress=lambda *a: seen.append(a)
    )
    config = json.loads((d / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    assert config["torch_dtype"] == "bfloat16"

    shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    n = len(shards)
    assert n > 3 and n == stats["shards"]
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((d / INDEX).read_text())
    stored, where = {}, {}
    for name in shards:
        with safe_open(d / name, "pt") as f:
            keys = f.keys()
            for k in keys:
                stored[k], where[k] = f.get_tensor(k), name
        size = sum(stored[k].numel() * stored[k].element_size() for k in keys)
        assert size <= SHARD or len(keys) == 1, name
    assert index["weight_map"] == where
    assert (
        index["metadata"]["total_size"]
        == stats["dst_bytes"]
        == sum(t.numel() * t.element_size() for t in stored.values())
    )
    assert stats["tensors_written"] == len(stored)

    source = file_tensors(src)
    n_fp8 = 0
    for key, t in source.items():
        if is_quantized_key(key):
            n_fp8 += 1
            scale = stored[key + "_scale_inv"]
            assert stored[key].dtype == FP8 and scale.dtype == torch.float32, key
            assert scale.shape == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128)), key
        else:
            want = torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16
            assert stored[key].dtype == want, key
            assert key + "_scale_inv" not in stored
    assert n_fp8 == stats["quantized"] == len(stored) - len(source) > 0
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.2.eh_proj.weight", "model.norm.weight"):  # fmt: skip
        assert stored[key].dtype == torch.bfloat16, key
    # shards follow the layer order: layer 1's tensors never come before layer 0's
    layer = [int(k.split(".")[2]) for k in index["weight_map"] if k.startswith("model.layers.")]
    assert layer == sorted(layer)

    done = [a for a, _ in seen]
    assert done == sorted(done) and seen[-1] == (stats["src_bytes"], stats["src_bytes"])


def test_small_checkpoint_is_one_file_and_other_files_travel(src, tmp_path):
    (src / "generation_config.json").write_text('{"temperature": 0.6}')
    (src / "inference").mkdir()  # subdirectories (scripts, figures) are not copied
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    (src / "config.json").write_text(json.dumps(config))
    stats = convert_checkpoint(src, tmp_path / "out", "fp8")
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    ]  # fmt: skip
    assert (out / "tokenizer.json").read_text() == '{"model": "bpe"}'
    assert stats["copied_files"] == ["generation_config.json", "tokenizer.json"]
    assert stats["shards"] == 1
    assert json.loads((out / "config.json").read_text())["auto_map"] == config["auto_map"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    # replacing an existing checkpoint is allowed, and leaves no temporary directories
    convert_checkpoint(src, out, "bf16")
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_scale_in_another_shard(src, tmp_path):
    """The release's index may put a weight and its scale in different files."""
    convert_checkpoint(src, tmp_path / "fp8", "fp8")
    convert_checkpoint(tmp_path / "fp8", tmp_path / "want", "bf16")
    d = tmp_path / "split"
    d.mkdir()
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    scales = {k: t for k, t in tensors.items() if k.endswith("_scale_inv")}
    save_file({k: t for k, t in tensors.items() if k not in scales}, d / "weights.safetensors")
    save_file(scales, d / "scales.safetensors")
    wm = {k: "scales.safetensors" if k in scales else "weights.safetensors" for k in tensors}
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text((tmp_path / "fp8" / "config.json").read_text())
    convert_checkpoint(d, tmp_path / "got", "bf16")
    want, got = file_tensors(tmp_path / "want"), file_tensors(tmp_path / "got")
    assert want.keys() == got.keys() and all(same(want[k], got[k]) for k in want)


# ------------------------------------------------------------------------------- bad input
@pytest.fixture
def fp8_single(src, tmp_path):
    d = tmp_path / "fp8"
    convert_checkpoint(src, d, "fp8")
    return d


def test_missing_scale_names_tensor_and_file(fp8_single, tmp_path):
    path = fp8_single / "model.safetensors"
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    tensors = load_file(path)
    del tensors[key + "_scale_inv"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{key}' is float8 but"):
        convert_checkpoint(fp8_single, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_orphan_scale_and_bad_scale_shape(fp8_single, tmp_path):
    path = fp8_single / "model.safetensors"
    key = "model.layers.0.self_attn.q_a_proj.weight"
    tensors = load_file(path)
    tensors[key + "_scale_inv"] = torch.ones(5, 5)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=f"tensor '{key}': scale_inv has shape"):
        convert_checkpoint(fp8_single, tmp_path / "out", "bf16")
    tensors["model.norm.weight_scale_inv"] = torch.ones(1)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="'model.norm.weight_scale_inv' has no float8 weight"):
        convert_checkpoint(fp8_single, tmp_path / "out", "bf16")
    assert sorted(os.listdir(tmp_path)) == ["fp8", "src"]


def test_corrupt_shard_names_the_file(src, tmp_path):
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=shard.name):
        convert_checkpoint(src, tmp_path / "out", "fp8")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_refuses_bad_destinations(src, tmp_path):
    with pytest.raises(CheckpointError, match="must differ from the source"):
        convert_checkpoint(src, src, "bf16")
    with pytest.raises(CheckpointError, match="must differ from the source"):
        convert_checkpoint(src, tmp_path / "." / "src", "bf16")
    with pytest.raises(CheckpointError, match="contains the source"):
        convert_checkpoint(src, tmp_path, "bf16")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="holds no config.json; refusing"):
        convert_checkpoint(src, precious, "bf16")
    assert os.listdir(precious) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        convert_checkpoint(src, tmp_path / "file", "bf16")
    with pytest.raises(ValueError, match="int4"):
        convert_checkpoint(src, tmp_path / "out", "int4")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "out", "bf16")
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        convert_checkpoint(src, tmp_path / "out", "bf16")
    assert sorted(os.listdir(tmp_path)) == ["file", "precious", "src"]
