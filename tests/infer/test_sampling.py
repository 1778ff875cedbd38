"""The sampling routine: greedy, temperature, top-k, top-p, seeds, log-probabilities."""

import pytest
import torch

from nanoseek.infer.sampling import SamplingBatch, SamplingParams, make_generator


def batch(*params, seeds=None):
    seeds = seeds or [i for i in range(len(params))]
    return SamplingBatch(list(params), [make_generator(s) for s in seeds])


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def test_greedy_is_argmax_of_raw_logits():
    logits = torch.randn(3, 50)
    sb = batch(SamplingParams(), SamplingParams(top_k=3), SamplingParams(top_p=0.1))
    assert torch.equal(sb.sample(logits), logits.argmax(-1))
    assert sb.all_greedy


def test_temperature_samples_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    T, n = 0.7, 6000
    sb = SamplingBatch([SamplingParams(temperature=T)] * n, [make_generator(0)] * n)
    tokens = sb.sample(logits.expand(n, -1))
    counts = torch.bincount(tokens, minlength=6).float()
    assert tv(counts, (logits / T).softmax(-1)) < 0.03


def test_top_k_and_top_p_restrict_the_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(400, -1)
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),  # 0.5 < 0.7 <= 0.8
        (SamplingParams(temperature=1.0, top_p=0.85), {0, 1, 2}),
        (SamplingParams(temperature=1.0, top_p=0.3), {0}),  # the first token always stays
        # top-p acts on what top-k kept, renormalised: 0.5 / 0.95 > 0.52 (0.5 alone would not be)
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.52), {0}),
    ]:
        sb = SamplingBatch([params] * 400, [make_generator(1)] * 400)
        got = set(sb.sample(logits).tolist())
        assert got == allowed, (params, got)
    # top-p renormalises what it keeps: {0, 1} at 0.5 : 0.3
    sb = SamplingBatch([SamplingParams(temperature=1.0, top_p=0.7)], [make_generator(0)])
    torch.testing.assert_close(sb.probs(probs.log()[None])[0], torch.tensor([0.625, 0.375, 0, 0]))


def test_seeded_rows_are_independent_of_the_rest_of_the_batch():
    logits = torch.randn(3, 100)
    hot = SamplingParams(temperature=1.0)
    alone = [batch(hot, seeds=[7]).sample(logits[1:2]) for _ in range(1)][0]
    mixed = batch(SamplingParams(), hot, SamplingParams(temperature=2.0), seeds=[1, 7, 3])
    assert mixed.sample(logits)[1] == alone[0]
    # the same seed twice gives the same stream of tokens
    a, b = batch(hot, seeds=[5]), batch(hot, seeds=[5])
    assert [a.sample(logits[:1]).item() for _ in range(20)] == [
        b.sample(logits[:1]).item() for _ in range(20)
    ]


def test_logprobs_are_of_the_temperature_scaled_distribution():
    logits = torch.randn(2, 30)
    sb = batch(SamplingParams(temperature=0.5, top_k=5, logprobs=True), SamplingParams())
    tokens = sb.sample(logits)
    want = torch.stack(
        [(logits[0] / 0.5).log_softmax(-1)[tokens[0]], logits[1].log_softmax(-1)[tokens[1]]]
    )
    torch.testing.assert_close(sb.token_logprobs(logits, tokens), want)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("max_new_tokens", dict(max_new_tokens=0)),
        ("temperature", dict(temperature=-1.0)),
        ("top_p", dict(top_p=0.0)),
        ("top_k", dict(top_k=-1)),
        ("stop_token_ids", dict(stop_token_ids=[1000])),
        ("stop", dict(stop=[""])),
    ],
)
def test_bad_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate(vocab_size=100)
