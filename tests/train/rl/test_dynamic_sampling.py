"""DAPO's dynamic sampling with a scripted sampler (rl/dynamic_sampling.py)."""

from nanoseek.train.rl.dynamic_sampling import sample_until_full


def _scripted(rounds: list[list[str]]):
    """Round k returns the groups rounds[k] ('s' has a signal, '-' none); logs the calls."""
    calls: list[int] = []

    def sample(k: int) -> list[str]:
        calls.append(k)
        return [f"{g}{k}.{i}" for i, g in enumerate(rounds[k])]

    return sample, calls


def _signal(group: str) -> bool:
    return group.startswith("s")


def test_samples_until_the_batch_is_full():
    sample, calls = _scripted([["s", "-", "-"], ["-", "s"], ["s", "s"], ["s"]])
    out = sample_until_full(sample, _signal, want=3, max_extra_rounds=5)
    # after round 0: 1 group with a signal, after round 1: 2, after round 2: 4 >= 3 -> stop
    assert calls == [0, 1, 2] and out.rounds == 3
    assert len(out.groups) == 7
    # the first three with a signal, in sampling order; the fourth is sampled but not chosen
    assert [out.groups[i] for i in out.chosen] == ["s0.0", "s1.1", "s2.0"]


def test_extra_rounds_are_bounded():
    sample, calls = _scripted([["-", "-"], ["s", "-"], ["s", "s"]])
    out = sample_until_full(sample, _signal, want=2, max_extra_rounds=1)
    assert calls == [0, 1] and out.rounds == 2  # 1 + 1 extra, though only 1 of 2 is filled
    assert [out.groups[i] for i in out.chosen] == ["s1.0"]


def test_one_round_when_the_first_is_enough_or_no_extra_rounds():
    sample, calls = _scripted([["s", "s", "-"], ["s"]])
    out = sample_until_full(sample, _signal, want=2, max_extra_rounds=4)
    assert calls == [0] and out.chosen == [0, 1]
    sample, calls = _scripted([["-", "-"], ["s", "s"]])
    out = sample_until_full(sample, _signal, want=2, max_extra_rounds=0)  # dynamic sampling off
    assert calls == [0] and out.chosen == [] and len(out.groups) == 2
