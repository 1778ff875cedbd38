"""Atomic writes and write errors that name the path (nanoseek/fsio.py and its users)."""

import errno
import json
import os

import pytest
import torch
from safetensors import SafetensorError

import nanoseek
from nanoseek import fsio
from nanoseek.checkpoint import io
from nanoseek.checkpoint import trainer_state as state_mod
from nanoseek.data.shards import ShardWriter, TokenShard
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.run_dir import clean_staging
from tests.helpers import random_model, tiny_config

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
# what safetensors raises when its write fails (a Rust io::Error in a debug dump)
ST_ENOSPC = SafetensorError(
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
    'on device" })'
)


def fail(exc):
    def raiser(*args, **kwargs):
        raise exc

    return raiser


def leftovers(d) -> list[str]:
    return [n for n in os.listdir(d) if ".tmp-" in n or ".old-" in n or n.startswith(".state-")]


def test_write_json_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "options.json"
    fsio.write_json(path, {"a": 1})
    monkeypatch.setattr(os, "fsync", fail(ENOSPC))
    with pytest.raises(OSError) as info:
        fsio.write_json(path, {"a": 2})
    assert str(info.value) == f"{path}: cannot write (No space left on device)"
    assert info.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {"a": 1} and leftovers(tmp_path) == []


def test_killed_write_leaves_a_temp_that_start_up_removes(tmp_path):
    (tmp_path / "options.json").write_text("{}")
    dead = 2**22 + 7  # no such process
    stale = tmp_path / f"options.json.tmp-{dead}-0123abcd"
    stale.write_text("{half")
    assert clean_staging(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == ["options.json"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["one two three, 4 + 5 = 9"] * 20, 300)


def test_tokenizer_save_is_skipped_when_identical(tok, tmp_path):
    d = tmp_path / "tokenizer"
    tok.save(d)
    before = {n: os.stat(d / n) for n in os.listdir(d)}
    tok.save(d)  # what every (re)start of a run does
    after = {n: os.stat(d / n) for n in os.listdir(d)}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in before.items()} == {
        n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()
    }
    assert leftovers(tmp_path) == []


def test_tokenizer_folder_replaced_as_a_whole_or_not_at_all(tok, tmp_path, monkeypatch):
    d = tmp_path / "tokenizer"
    tok.save(d)
    (d / "chat_template.jinja").write_text("{{ 'stale' }}")  # from a transformers save
    changed = Tokenizer(tok.backend, "{{ bos_token }}new")
    rename = os.rename

    def crash_on_publish(src, dst):
        if ".tmp-" in os.fspath(src):
            raise ENOSPC
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_publish)
    with pytest.raises(OSError, match=f"{d}: cannot write"):
        changed.save(d)
    monkeypatch.undo()
    assert Tokenizer.load(d).chat_template == "{{ 'stale' }}"  # the old folder, whole
    assert leftovers(tmp_path) == []
    changed.save(d)
    assert sorted(os.listdir(d)) == ["tokenizer.json", "tokenizer_config.json"]
    assert Tokenizer.load(d).chat_template == "{{ bos_token }}new"


def test_tokenizer_saved_into_a_folder_with_other_files_keeps_them(tok, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    tok.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert Tokenizer.load(tmp_path).fingerprint == tok.fingerprint


def test_shard_write_failure_keeps_the_previous_shard(tmp_path, monkeypatch):
    prefix = tmp_path / "train"
    with ShardWriter(prefix, vocab_size=50, bos_id=0, eos_id=1) as w:
        w.add_batch([[5, 6, 7], [8]])
    monkeypatch.setattr(os, "fsync", fail(ENOSPC))
    w = ShardWriter(prefix, vocab_size=50, bos_id=0, eos_id=1)
    w.add_batch([[9] * 100])
    with pytest.raises(OSError, match=f"{prefix}.bin: cannot write \\(No space left on device"):
        w.close()
    monkeypatch.undo()
    shard = TokenShard.open(tmp_path, "train")
    assert shard.n_docs == 2 and sorted(os.listdir(tmp_path)) == [
        "train.bin", "train.idx", "train.json"
    ]  # fmt: skip


@pytest.mark.parametrize("exc", [ENOSPC, ST_ENOSPC], ids=["OSError", "SafetensorError"])
def test_checkpoint_save_on_a_full_disk(tmp_path, monkeypatch, exc):
    model = random_model(tiny_config(), seed=1)
    first = state_mod.save_checkpoint(str(tmp_path), 1, model, {"step": 1, "rng": None})
    monkeypatch.setattr(io, "save_file", fail(exc))
    with pytest.raises(OSError) as info:
        state_mod.save_checkpoint(str(tmp_path), 2, random_model(tiny_config(), seed=2), {})
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}/checkpoints/step-000002: cannot save the checkpoint (No ")
    assert "No space left on device" in msg and "\n" not in msg
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-000001"]  # no staging left behind
    again = nanoseek.load(first)
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_trainer_state_write_on_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(state_mod, "save_file", fail(ST_ENOSPC))
    with pytest.raises(OSError, match="step-000004: cannot save the checkpoint \\(No space"):
        state_mod.save_checkpoint(str(tmp_path), 4, random_model(tiny_config()), {"step": 4})
    assert os.listdir(tmp_path / "checkpoints") == []


def test_model_save_into_a_read_only_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OSError, match=f"{ro}/model: cannot save the checkpoint"):
            nanoseek.save(random_model(tiny_config()), ro / "model")
    finally:
        ro.chmod(0o755)
    assert os.listdir(ro) == []
