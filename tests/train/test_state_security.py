"""Nothing a checkpoint holds can run code: a pickle payload planted at every place a checkpoint
is read (the trainer state, an old `trainer_state.pt`, the DCP index, a DCP value) is refused
with a one-line error naming the file, and its payload never runs."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings

import pytest
import torch

from nanoseek.checkpoint.io import CheckpointError
from nanoseek.checkpoint.trainer_state import (
    LEGACY_NAME,
    STATE_NAME,
    TENSORS_NAME,
    load_state,
    rng_state,
    save_checkpoint,
    write_state,
)
from nanoseek.cli import main
from nanoseek.train.run_dir import resumable_checkpoint
from tests.helpers import random_model, tiny_config


class Payload:
    """Unpickling this writes the marker file: proof that the loader ran code from the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture
def marker(tmp_path):
    path = str(tmp_path / "PAYLOAD_RAN")
    yield path
    assert not os.path.exists(path), "a checkpoint ran code while being loaded"


def _one_line(e: BaseException, *names: str) -> str:
    msg = str(e)
    assert "\n" not in msg
    for name in names:
        assert name in msg, msg
    return msg


def _model_and_optimizer():
    model = random_model(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 97, (1, 8))).logits.float().sum().backward()
    opt.step()
    return model, opt


def _checkpoint(tmp_path, step=1):
    model, opt = _model_and_optimizer()
    state = {"step": step, "data": {"position": 3}, "rng": rng_state(),
             "optimizer": opt.state_dict(), "options": {"lr": 1e-3}}  # fmt: skip
    out = str(tmp_path / "run")
    return out, save_checkpoint(out, step, model, state, keep_last=0)


def test_trainer_state_round_trips_exactly(tmp_path):
    import random

    import numpy as np

    model, opt = _model_and_optimizer()
    random.random(), np.random.rand()  # noqa: B018 - advance the generators off their seeds
    state = {"step": 7, "rng": rng_state(), "optimizer": opt.state_dict(),
             "data": {"pos": [1, (2, 3)], 5: None, "__odd": float("inf")}}  # fmt: skip
    write_state(state, str(tmp_path))
    got = load_state(str(tmp_path))
    assert got["step"] == 7 and got["data"] == state["data"]
    assert got["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(got["rng"]["torch"], state["rng"]["torch"])
    np_saved, np_got = state["rng"]["numpy"], got["rng"]["numpy"]
    assert np_got[0] == np_saved[0] and np.array_equal(np_got[1], np_saved[1])
    assert np_got[1].dtype == np_saved[1].dtype and np_got[2:] == np_saved[2:]
    twin = torch.optim.AdamW(model.parameters(), lr=1e-3)
    twin.load_state_dict(got["optimizer"])  # keys, tuples (betas) and tensors as saved
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(twin.state[p][k], v), k


@pytest.mark.parametrize("name", [STATE_NAME, TENSORS_NAME])
def test_a_pickle_in_place_of_the_trainer_state_is_refused(tmp_path, marker, name):
    out, path = _checkpoint(tmp_path)
    with open(os.path.join(path, name), "wb") as f:
        pickle.dump({"step": 1, "x": Payload(marker)}, f)
    with pytest.raises(CheckpointError) as e:
        load_state(path)
    _one_line(e.value, os.path.join(path, name))
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resumable_checkpoint(out)


def test_an_old_pickled_trainer_state_is_never_unpickled(tmp_path, marker):
    out, path = _checkpoint(tmp_path)
    for name in (STATE_NAME, TENSORS_NAME):
        os.remove(os.path.join(path, name))
    torch.save({"step": 1, "x": Payload(marker)}, os.path.join(path, LEGACY_NAME))
    with pytest.raises(CheckpointError) as e:
        load_state(path)
    _one_line(e.value, os.path.join(path, LEGACY_NAME), "pickle")


def test_cli_resume_from_a_folder_holding_only_a_planted_pickle(tmp_path, marker, capsys):
    """The reported attack: a run folder with one crafted trainer_state.pt; `--resume` (and
    the speedrun, which always resumes) must stop with one line, the payload unrun."""
    out = tmp_path / "run"
    planted = out / "checkpoints" / "step-000100" / LEGACY_NAME
    planted.parent.mkdir(parents=True)
    torch.save({"step": 100, "x": Payload(marker)}, planted)
    cfg = tmp_path / "model.json"
    tiny_config(vocab_size=512, num_hidden_layers=2).save_pretrained(tmp_path)
    os.replace(tmp_path / "config.json", cfg)
    args = ["pretrain", "--out", str(out), "--resume", f"--model={cfg}", "--corpus_docs=200",
            "--vocab_size=512", "--seq_len=32", "--batch_size=2", "--max_steps=1",
            "--eval_every=0", "--precision=fp32", "--plot=false"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek: error: ") and err.count("\n") == 1, err
    assert str(planted) in err and "Traceback" not in err


# ------------------------------------------------------------------ sharded (DCP) checkpoints
def _sharded(tmp_path, bad_value=None):
    """A DCP checkpoint of a model and a bf16-moment AdamW (whose int `step` DCP stores as a
    pickled value), written by this one process; `bad_value` replaces one such step."""
    import torch.distributed.checkpoint as dcp

    from nanoseek.dist.checkpoint import SHARDS, sharded_state
    from nanoseek.train.adamw_bf16 import AdamWBF16Moments

    model = random_model(tiny_config())
    opt = AdamWBF16Moments(model.parameters())
    model(torch.randint(0, 97, (1, 8))).logits.float().sum().backward()
    opt.step()
    flat = sharded_state(model, opt)
    if bad_value is not None:
        key = next(k for k in flat if k.startswith("optim.") and k.endswith(".step"))
        flat[key] = bad_value
    path = str(tmp_path / "run" / "checkpoints" / "step-000001")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(flat, checkpoint_id=os.path.join(path, SHARDS))
    write_state({"step": 1, "rng": rng_state(), "data": {}}, path)
    model.config.save_pretrained(path)
    fresh = random_model(tiny_config(), seed=1)
    return path, fresh, AdamWBF16Moments(fresh.parameters())


def test_a_sharded_checkpoint_still_loads(tmp_path):
    from nanoseek.dist.checkpoint import load_sharded

    path, model, opt = _sharded(tmp_path)
    load_sharded(path, model, opt)
    assert all(isinstance(s["step"], int) and s["step"] == 1 for s in opt.state.values())
    assert resumable_checkpoint(str(tmp_path / "run"))[0] == path


def test_a_pickle_payload_in_the_dcp_index_never_runs(tmp_path, marker):
    from nanoseek.dist.checkpoint import load_sharded

    path, model, opt = _sharded(tmp_path)
    metadata = os.path.join(path, "dcp", ".metadata")
    with open(metadata, "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(CheckpointError) as e:
        load_sharded(path, model, opt)
    _one_line(e.value, metadata)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resumable_checkpoint(str(tmp_path / "run"))


def test_a_pickle_payload_in_a_dcp_value_never_runs(tmp_path, marker):
    from nanoseek.dist.checkpoint import load_sharded

    path, model, opt = _sharded(tmp_path, bad_value=Payload(marker))
    with pytest.raises(CheckpointError) as e:
        load_sharded(path, model, opt)
    _one_line(e.value, "optim.", "not plain data")


def test_the_dcp_index_may_not_name_files_outside_the_checkpoint(tmp_path):
    from nanoseek.dist.safe_dcp import read_metadata

    path, _, _ = _sharded(tmp_path)
    metadata = os.path.join(path, "dcp", ".metadata")
    with open(metadata, "rb") as f:
        index = pickle.load(f)  # our own file, written just above
    next(iter(index.storage_data.values())).relative_path = "../../../etc/passwd"
    with open(metadata, "wb") as f:
        pickle.dump(index, f)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        read_metadata(os.path.join(path, "dcp"))


def test_a_truncated_dcp_shard_is_not_resumed_from(tmp_path):
    path, _, _ = _sharded(tmp_path)
    older = path.replace("step-000001", "step-000000")
    shutil.copytree(path, older)
    shard = os.path.join(path, "dcp", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.warns(UserWarning, match="step-000001.*truncated"):
        assert resumable_checkpoint(str(tmp_path / "run"))[0] == older


def test_a_run_in_a_relative_directory_resumes(tmp_path, monkeypatch):
    """`--out runs/x` (relative, the CLI's usual form) finds its own checkpoints whole."""
    monkeypatch.chdir(tmp_path)
    model, opt = _model_and_optimizer()
    state = {"step": 2, "data": {}, "rng": rng_state(), "optimizer": opt.state_dict()}
    path = save_checkpoint(os.path.join("runs", "x"), 2, model, state)
    found, loaded = resumable_checkpoint(os.path.join("runs", "x"))
    assert os.path.samefile(found, path) and loaded["step"] == 2
