"""Checkpoint directories: round trips, the on-disk layout, bad input, atomic replacement."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError, ConfigError
from nanoseek.checkpoint import io
from tests.helpers import random_model, tiny_config

INDEX = "model.safetensors.index.json"


def file_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint directory, read straight from the safetensors files."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def file_dtypes(directory) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


def assert_same_model(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        oa, ob = a(x), b(x)
    assert torch.equal(oa.logits, ob.logits)
    assert len(oa.mtp_logits) == len(ob.mtp_logits) == a.config.num_nextn_predict_layers
    for la, lb in zip(oa.mtp_logits, ob.mtp_logits):
        assert torch.equal(la, lb)


@pytest.fixture
def ids():
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_round_trip_identical(tmp_path, ids, tied, sharded):
    model = random_model(tiny_config(tie_word_embeddings=tied, num_nextn_predict_layers=2))
    d = tmp_path / "ckpt"
    nanoseek.save(model, d, max_shard_bytes=20_000 if sharded else io.DEFAULT_SHARD_BYTES)
    files = sorted(os.listdir(d))
    if sharded:
        shards = [f for f in files if f.endswith(".safetensors")]
        assert len(shards) > 2 and "model.safetensors" not in files
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        index = json.loads((d / INDEX).read_text())
        stored = file_tensors(d)
        assert set(index["weight_map"]) == set(stored)
        assert set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in stored.values()
        )
    else:
        assert files == ["config.json", "model.safetensors"]
    loaded = nanoseek.load(d)
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert "lm_head.weight" not in file_tensors(
            d
        )  # like transformers: the head is the embedding
    assert_same_model(model, loaded, ids)


def test_layout_mtp_and_experts(tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = random_model(cfg)
    nanoseek.save(model, tmp_path)
    stored = file_tensors(tmp_path)
    L, E, F, D = cfg.num_hidden_layers, cfg.n_routed_experts, cfg.moe_intermediate_size, 64
    assert not any(
        k.startswith("mtp.") or k.endswith(("gate_up_proj", "experts.down_proj")) for k in stored
    )
    state = model.state_dict()
    for k in range(2):  # MTP module k+1 is layer L+k, with copies of the shared weights
        p = f"model.layers.{L + k}."
        assert torch.equal(stored[p + "embed_tokens.weight"], state["model.embed_tokens.weight"])
        assert torch.equal(stored[p + "shared_head.head.weight"], state["lm_head.weight"])
        assert torch.equal(stored[p + "eh_proj.weight"], state[f"mtp.{k}.eh_proj.weight"])
        assert torch.equal(
            stored[p + "shared_head.norm.weight"], state[f"mtp.{k}.shared_head.norm.weight"]
        )
        for e in range(E):
            gate_up = state[f"mtp.{k}.mlp.experts.gate_up_proj"][e]
            assert torch.equal(stored[p + f"mlp.experts.{e}.gate_proj.weight"], gate_up[:F])
            assert torch.equal(stored[p + f"mlp.experts.{e}.up_proj.weight"], gate_up[F:])
            assert stored[p + f"mlp.experts.{e}.down_proj.weight"].shape == (D, F)
    assert f"model.layers.{L + 2}.eh_proj.weight" not in stored
    # the main layers' experts too
    gate_up = state[f"model.layers.{L - 1}.mlp.experts.gate_up_proj"]
    assert torch.equal(
        stored[f"model.layers.{L - 1}.mlp.experts.{E - 1}.up_proj.weight"], gate_up[E - 1, F:]
    )


def test_bf16_keeps_router_bias_fp32(tmp_path, ids):
    model = random_model(tiny_config())
    nanoseek.save(model, tmp_path, dtype=torch.bfloat16)
    dtypes = file_dtypes(tmp_path)
    bias_keys = [k for k in dtypes if k.endswith("e_score_correction_bias")]
    assert len(bias_keys) == 3  # two MoE layers + the MTP layer
    for k, dt in dtypes.items():
        assert dt == ("F32" if k in bias_keys else "BF16"), k
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"

    loaded = nanoseek.load(tmp_path, dtype=torch.bfloat16)
    for moe_a, moe_b in zip(model.moe_layers(), loaded.moe_layers()):
        assert moe_b.gate.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(moe_a.gate.e_score_correction_bias, moe_b.gate.e_score_correction_bias)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert_same_model(model.to(torch.bfloat16), loaded, ids)  # .to keeps the bias fp32 too


def test_hf_style_checkpoint_without_mtp_loads_with_warning(tmp_path, ids):
    model = random_model(tiny_config())
    nanoseek.save(model, tmp_path)
    L = model.config.num_hidden_layers
    rewrite(tmp_path / "model.safetensors", drop=lambda k: k.startswith(f"model.layers.{L}."))
    with pytest.warns(UserWarning, match="no weights for them; loading without MTP"):
        loaded = nanoseek.load(tmp_path)
    assert len(loaded.mtp) == 0 and loaded.config.num_nextn_predict_layers == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        assert loaded(ids).mtp_logits == []


def test_v2_style_router_without_bias(tmp_path, ids):
    """V2 checkpoints (softmax, group-limited greedy) have no e_score_correction_bias."""
    cfg = tiny_config(scoring_func="softmax", topk_method="group_limited_greedy", topk_group=1)
    model = random_model(cfg)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.zero_()
    nanoseek.save(model, tmp_path)
    rewrite(tmp_path / "model.safetensors", drop=lambda k: k.endswith("e_score_correction_bias"))
    assert_same_model(model, nanoseek.load(tmp_path), ids)


def test_extra_files_copied(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    nanoseek.save(random_model(tiny_config()), tmp_path / "ck", extra_files=[tok])
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == "{}"
    clash = tmp_path / "config.json"
    clash.write_text("{}")
    with pytest.raises(ValueError, match="config.json"):
        nanoseek.save(random_model(tiny_config()), tmp_path / "ck2", extra_files=[clash])
    assert sorted(os.listdir(tmp_path)) == ["ck", "config.json", "tokenizer.json"]


# ------------------------------------------------------------------------------- bad input
def rewrite(path, drop=lambda k: False, change=lambda k, t: t):
    tensors = load_file(path)
    save_file({k: change(k, t) for k, t in tensors.items() if not drop(k)}, path)


@pytest.fixture
def saved(tmp_path):
    d = tmp_path / "ckpt"
    nanoseek.save(random_model(tiny_config()), d)
    return d


def raises_one_line(exc, *needles):
    """pytest.raises that also checks the message is one line naming each needle."""

    class Check:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            handled = self.cm.__exit__(*a)
            msg = str(self.info.value)
            assert "\n" not in msg, msg
            for n in needles:
                assert str(n) in msg, (n, msg)
            return handled

    return Check()


def test_truncated_file(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with raises_one_line(CheckpointError, path, "truncated"):
        nanoseek.load(saved)


@pytest.mark.parametrize(
    "garbage", [os.urandom(4096), b"\x10" + b"\x00" * 7 + b"{not json!}" * 10, b""]
)
def test_corrupt_header(saved, garbage):
    path = saved / "model.safetensors"
    path.write_bytes(garbage)
    with raises_one_line(CheckpointError, path, "corrupt"):
        nanoseek.load(saved)


def test_missing_tensor(saved):
    key = "model.layers.2.self_attn.kv_b_proj.weight"
    rewrite(saved / "model.safetensors", drop=lambda k: k == key)
    with raises_one_line(CheckpointError, saved, key):
        nanoseek.load(saved)


def test_missing_expert(saved):
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    rewrite(saved / "model.safetensors", drop=lambda k: k == key)
    with raises_one_line(CheckpointError, key):
        nanoseek.load(saved)


def test_shape_mismatch(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 80  # the dense layer's tensors are 96 wide
    (saved / "config.json").write_text(json.dumps(cfg))
    with raises_one_line(
        CheckpointError, saved / "model.safetensors", "model.layers.0.mlp.", "the config expects"
    ):
        nanoseek.load(saved)


def test_bad_config_value(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["n_group"] = 3  # 8 experts
    (saved / "config.json").write_text(json.dumps(cfg))
    with raises_one_line(ConfigError, saved / "config.json", "n_routed_experts", "n_group=3"):
        nanoseek.load(saved)


def test_config_not_json(saved):
    (saved / "config.json").write_text("{oops")
    with raises_one_line(ConfigError, saved / "config.json"):
        nanoseek.load(saved)


def test_index_names_missing_shard(tmp_path):
    d = tmp_path / "ckpt"
    nanoseek.save(random_model(tiny_config()), d, max_shard_bytes=20_000)
    victim = d / "model-00002-of-{:05d}.safetensors".format(len(list(d.glob("*.safetensors"))))
    victim.unlink()
    with raises_one_line(CheckpointError, victim, "missing"):
        nanoseek.load(d)


def test_index_names_tensor_absent_from_its_shard(tmp_path):
    d = tmp_path / "ckpt"
    nanoseek.save(random_model(tiny_config()), d, max_shard_bytes=20_000)
    index = json.loads((d / INDEX).read_text())
    key = "model.norm.weight"
    rewrite(d / index["weight_map"][key], drop=lambda k: k == key)
    with raises_one_line(CheckpointError, index["weight_map"][key], key):
        nanoseek.load(d)


def test_bad_index(saved):
    (saved / INDEX).write_text('{"weight_map": ["a"]}')
    with raises_one_line(CheckpointError, saved / INDEX):
        nanoseek.load(saved)


def test_not_a_directory(tmp_path):
    with raises_one_line(CheckpointError, tmp_path / "nope"):
        nanoseek.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with raises_one_line(FileNotFoundError, tmp_path / "empty" / "config.json"):
        nanoseek.load(tmp_path / "empty")


def test_no_weight_files(saved):
    (saved / "model.safetensors").unlink()
    with raises_one_line(CheckpointError, saved, "no *.safetensors"):
        nanoseek.load(saved)


def test_unknown_tensor_warns(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(tensors, saved / "model.safetensors")
    with pytest.warns(UserWarning, match="ignored 1 unknown tensors, e.g. 'model.layers.0.mystery"):
        nanoseek.load(saved)


# ------------------------------------------------------------------------------- atomic save
def test_save_replaces_atomically(tmp_path, ids):
    d = tmp_path / "ckpt"
    first, second = random_model(tiny_config(), seed=1), random_model(tiny_config(), seed=2)
    nanoseek.save(first, d, max_shard_bytes=20_000)  # sharded, then single: no stale shards
    nanoseek.save(second, d)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no *.tmp-* / *.old-* left
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    assert_same_model(second, nanoseek.load(d), ids)
    (tmp_path / "plain").mkdir()  # permissions as for any new directory (umask), not 0700
    assert d.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_failed_save_keeps_previous_checkpoint(tmp_path, ids, monkeypatch):
    d = tmp_path / "ckpt"
    first = random_model(tiny_config(), seed=1)
    nanoseek.save(first, d)
    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(io, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        nanoseek.save(random_model(tiny_config(), seed=2), d, max_shard_bytes=20_000)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert_same_model(first, nanoseek.load(d), ids)


def test_failed_rename_restores_previous_checkpoint(tmp_path, ids, monkeypatch):
    d = tmp_path / "ckpt"
    first = random_model(tiny_config(), seed=1)
    nanoseek.save(first, d)
    rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in os.fspath(src):  # the step that publishes the new checkpoint
            raise OSError("rename failed")
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        nanoseek.save(random_model(tiny_config(), seed=2), d)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert_same_model(first, nanoseek.load(d), ids)


def test_save_refuses_to_replace_a_file(tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("not a checkpoint")
    with raises_one_line(CheckpointError, f, "not a directory"):
        nanoseek.save(random_model(tiny_config()), f)
    assert f.read_text() == "not a checkpoint" and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_rejects_fp8_dtype(tmp_path):
    with pytest.raises(ValueError, match="fp8=True"):
        nanoseek.save(random_model(tiny_config()), tmp_path / "x", dtype=torch.float8_e4m3fn)
