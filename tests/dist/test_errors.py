"""Bad distributed launches fail with a clear message on every rank, and never hang.

Checks that run before the rendezvous are called for each rank of a 2-process world in turn;
two cases start both ranks as real `python -m nanoseek pretrain` processes (with a hand-made
torchrun environment) and wait at most TIMEOUT seconds for both: one stopped before the
rendezvous, one where rank 0 fails after it while the other waits for its data.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nanoseek.config import ConfigError
from nanoseek.dist.env import RENDEZVOUS_VARS, LaunchError, read_env
from nanoseek.dist.mesh import mesh_shape
from tests.dist.launch import free_port, torchrun_env
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 90


def test_read_env():
    assert read_env({}) is None  # a plain single-process run
    env = read_env(torchrun_env(1, 2, 29500))
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (1, 2, 1, 29500)
    partial = {k: v for k, v in torchrun_env(0, 2, 29500).items() if k != "MASTER_PORT"}
    with pytest.raises(LaunchError, match="MASTER_PORT not set"):
        read_env(partial)
    with pytest.raises(LaunchError, match="RANK=2"):
        read_env(torchrun_env(2, 2, 29500))
    with pytest.raises(LaunchError, match="not an integer"):
        read_env({**torchrun_env(0, 2, 29500), "WORLD_SIZE": "two"})


def test_mesh_shape():
    assert mesh_shape(8, 0, 4, 16) == mesh_shape(8, 2, 4, 16)
    assert (mesh_shape(2, 0, 1, 8).dp, mesh_shape(2, 0, 2, 8).ep) == (2, 2)
    with pytest.raises(ConfigError, match="does not fit the world of 4"):
        mesh_shape(4, 3, 1, 8)
    with pytest.raises(ConfigError, match="do not divide the world of 6"):
        mesh_shape(6, 0, 4, 8)
    with pytest.raises(ConfigError, match="do not divide n_routed_experts=6"):
        mesh_shape(4, 0, 4, 6)
    with pytest.raises(ConfigError, match="no routed experts"):
        mesh_shape(2, 0, 2, None)


def _launch_pair(tmp_path, name: str, env_edit, *args: str) -> list[subprocess.Popen]:
    """Both ranks of a 2-process world, started at once."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in torchrun_env(0, 1, 0)}
        env.update(torchrun_env(rank, 2, port), OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        env_edit(env)
        cmd = [
            sys.executable, "-m", "nanoseek", "pretrain", "--out", str(tmp_path / name),
            "--dist_timeout_s=30", "--corpus_docs=50", *args,
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _collect(procs) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process, or a failure after TIMEOUT s."""
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank still runs after {TIMEOUT} s: it hangs") from None
        out.append((p.returncode, err.decode()))
    return out


@pytest.mark.parametrize(
    "edit, options, message",
    [
        (lambda e: e.pop("MASTER_ADDR"), {}, "MASTER_ADDR not set"),
        (lambda e: None, {"dp": 3}, "dp=3 x ep=1 = 3 ranks does not fit the world of 2"),
        (lambda e: None, {"ep": 2, "n_experts": 3}, "do not divide n_routed_experts=3"),
        (lambda e: None, {"batch_size": 5}, "do not split over 2 processes"),
    ],
)
def test_bad_launch_fails_on_each_rank_before_the_rendezvous(monkeypatch, edit, options, message):
    """Each rank, alone (nobody else is started): the error comes before any communication,
    so a rank cannot wait for a peer that already stopped."""
    from nanoseek.dist.parallel import launch
    from nanoseek.train.pretrain import PretrainOptions

    n_experts = options.pop("n_experts", 8)
    for rank in range(2):
        env = torchrun_env(rank, 2, free_port())
        edit(env)
        for k in RENDEZVOUS_VARS:
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ConfigError, match=message):
            with launch(PretrainOptions(**{"batch_size": 4, **options}), n_experts):
                pass


def test_bad_launches_through_the_cli_fail_on_every_rank(tmp_path):
    odd = tmp_path / "odd"
    tiny_config(n_routed_experts=3, n_group=1, topk_group=1).save_pretrained(odd)
    cases = {  # name: (environment edit, arguments, message every rank must print)
        "experts % ep": (
            lambda e: None,
            [f"--model={odd / 'config.json'}", "--ep=2"],
            "do not divide n_routed_experts=3",
        ),
        # past the rendezvous: rank 0 fails while preparing the data the others wait for
        "rank 0 fails": (lambda e: None, ["--data=missing.txt"], "missing.txt"),
    }
    started = {
        name: _launch_pair(tmp_path, name.replace(" ", "_"), edit, *args)
        for name, (edit, args, _) in cases.items()
    }  # all at once: the whole test waits for the slowest case only
    for name, procs in started.items():
        message = cases[name][2]
        for rank, (code, err) in enumerate(_collect(procs)):
            assert code == 2, f"{name}, rank {rank}: exit {code}\n{err[-2000:]}"
            assert message in err, f"{name}, rank {rank}: {err[-2000:]}"
            assert "Traceback" not in err, f"{name}, rank {rank}: {err[-2000:]}"
