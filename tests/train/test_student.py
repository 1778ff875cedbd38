"""The student initialised from a pre-trained base's layers."""

from __future__ import annotations

import os

import pytest

from nanoseek.config import ConfigError


def test_student_from_base_keeps_the_picked_layers(tmp_path):
    import torch

    import nanoseek
    from nanoseek.train.student import student_from_base
    from tests.helpers import random_model, tiny_config

    base = random_model(tiny_config(num_hidden_layers=4, first_k_dense_replace=1), seed=0)
    nanoseek.save(base, str(tmp_path / "base"))
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    same = nanoseek.load(student_from_base(str(tmp_path / "base"), 4, str(tmp_path / "s4")))
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    torch.testing.assert_close(same(ids).logits, base(ids).logits)  # all layers: the base itself
    small = nanoseek.load(student_from_base(str(tmp_path / "base"), 2, str(tmp_path / "s2")))
    assert small.config.num_hidden_layers == 2 and small.config.first_k_dense_replace == 1
    assert os.path.isfile(tmp_path / "s2" / "tokenizer.json")
    for mine, theirs in ((0, 0), (1, 3)):  # evenly spread from first to last
        torch.testing.assert_close(small.model.layers[mine].state_dict(),
                                   base.model.layers[theirs].state_dict())  # fmt: skip
    torch.testing.assert_close(small.mtp.state_dict(), base.mtp.state_dict())
    with pytest.raises(ConfigError, match="student_layers"):
        student_from_base(str(tmp_path / "base"), 5, str(tmp_path / "s5"))
