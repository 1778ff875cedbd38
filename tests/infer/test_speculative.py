"""MTP speculative decoding: the acceptance rule keeps the distribution; greedy stays exact."""

import pytest
import torch

from nanoseek.infer import Engine, SamplingParams, generate, native
from nanoseek.infer import runner as runner_mod
from nanoseek.infer.speculative import accept_drafts
from tests.helpers import random_model, tiny_config


def tv(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=p.numel()).float()
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def test_acceptance_rule_keeps_the_target_distribution():
    """Toy p (target) and q (draft) per position, k = 2: the first emitted token is distributed
    as p_0, the second (when the first draft was accepted) as p_1, and draft 1 is accepted
    with probability sum_x min(p_0(x), q_1(x)) = 1 - TV(p_0, q_1)."""
    g = torch.Generator().manual_seed(0)
    k, n = 2, 40_000
    p = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.5, 0.1, 0.1, 0.1],
                      [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])  # fmt: skip
    q = torch.tensor([[0.1, 0.5, 0.1, 0.1, 0.1, 0.1], [0.3, 0.0, 0.3, 0.4, 0.0, 0.0]])
    drafts = torch.stack(
        [torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(k)], 1
    )

    def draw(w):
        return (w / torch.empty_like(w).exponential_(generator=g)).argmax(-1)

    u = torch.rand(n, k, generator=g)
    accepted, nxt = accept_drafts(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, u, draw)
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    assert tv(first, p[0]) < 0.01
    two = accepted > 0
    second = torch.where(accepted[two] > 1, drafts[two, 1], nxt[two])
    assert tv(second, p[1]) < 0.015
    expected = torch.minimum(p[0], q[0]).sum().item()
    assert abs(two.float().mean().item() - expected) < 0.01
    # all accepted: the bonus token comes from p_k
    assert tv(nxt[accepted == 2], p[2]) < 0.03


def test_identical_draft_and_target_always_accept():
    p = torch.softmax(torch.randn(5, 3, 10), -1)
    drafts = torch.randint(0, 10, (5, 2))
    accepted, _ = accept_drafts(p, p[:, :2], drafts, torch.rand(5, 2), lambda w: w.argmax(-1))
    assert accepted.tolist() == [2] * 5


@pytest.mark.parametrize("draft_quantize", [None, "int8"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(k, draft_quantize):
    """Batch of 4 prompts of different lengths (one of a single token), queued through 2 rows
    (so rows are refilled): token for token the plain greedy output, whatever the drafts'
    weights."""
    model = random_model(tiny_config())
    prompts = [[5, 9, 11, 3], [7, 8], [20, 30, 40, 50, 60, 70, 80], [42]]
    params = SamplingParams(max_new_tokens=15, ignore_eos=True)
    plain = Engine(model, max_batch_size=2, max_seq_len=64).generate(prompts, params)
    engine = Engine(model, max_batch_size=2, max_seq_len=64, speculative="mtp", num_draft=k,
                    draft_quantize=draft_quantize)  # fmt: skip
    spec = engine.generate(prompts, params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    runner = engine.runner
    if draft_quantize:  # the drafts multiplied with int8 copies; the verify steps did not
        assert runner.draft_weights.quantize == "int8" and runner.draft_weights.nbytes() > 0
        assert runner.weights.quantize is None
    else:
        assert runner.draft_weights is runner.weights
    rates = engine.speculator.acceptance_rates()
    assert len(rates) == k and all(0.0 <= r <= 1.0 for r in rates)
    assert 1.0 <= engine.speculator.tokens_per_step() <= k + 1


def test_speculative_api_matches_plain_api():
    model = random_model(tiny_config())
    ids = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(1))
    want = generate(model, ids, max_new_tokens=12)
    assert torch.equal(
        generate(model, ids, max_new_tokens=12, speculative="mtp", num_draft=2), want
    )


def test_rollback_leaves_the_caches_consistent():
    """After every step the main cache holds prompt + emitted - 1 positions (the last token is
    pending) and the MTP cache is behind it by the positions it has not seen."""
    model = random_model(tiny_config())
    engine = Engine(model, max_batch_size=2, max_seq_len=64, speculative="mtp", num_draft=3)
    for p in ([5, 6, 7], [9, 10, 11, 12, 13]):
        engine.add_request(p, SamplingParams(max_new_tokens=30, temperature=1.0, seed=0))
    while engine.has_unfinished():
        engine.step()
        for row, seq in enumerate(engine.running):
            n = len(seq.prompt_ids) + len(seq.output_ids) - 1
            assert engine.runner.cache.lengths[row] == n
            assert engine.runner.mtp_cache.lengths[row] == n - len(seq.mtp_next)
            assert seq.mtp_next[-1] == seq.output_ids[-1]


@pytest.mark.parametrize("draft_quantize", [None, "int8"])
def test_speculative_sampling_is_seeded_and_logprobs_match_plain(draft_quantize):
    model = random_model(tiny_config())
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.95, seed=3, logprobs=True)
    runs = [
        Engine(
            model,
            max_batch_size=1,
            max_seq_len=64,
            speculative="mtp",
            num_draft=2,
            draft_quantize=draft_quantize,
        ).generate([[4, 5, 6]], params)[0]  # fmt: skip
        for _ in range(2)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    # the log-probs are the main model's, temperature-scaled, whatever drafted the tokens
    ids = torch.tensor([[4, 5, 6] + runs[0].token_ids])
    with torch.no_grad():
        logits = model(ids, mtp=False).logits[0, 2:-1] / 0.8
    want = logits.log_softmax(-1).gather(-1, ids[0, 3:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(runs[0].logprobs), want, atol=1e-4, rtol=0)


def test_greedy_and_sampled_rows_in_one_speculative_batch():
    """A greedy row batched with sampled ones keeps plain greedy's tokens; a sampled row's
    log-probs are the main model's whatever was accepted around it."""
    model = random_model(tiny_config())
    greedy = SamplingParams(max_new_tokens=14, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=14, ignore_eos=True, temperature=1.0, seed=5,
                             logprobs=True)  # fmt: skip
    prompts = [[5, 9, 11, 3], [7, 8, 9], [20, 30]]
    want = Engine(model, max_batch_size=1, max_seq_len=64).generate([prompts[0]], greedy)
    engine = Engine(model, max_batch_size=3, max_seq_len=64, speculative="mtp", num_draft=2)
    out = engine.generate(prompts, [greedy, sampled, sampled])
    assert out[0].token_ids == want[0].token_ids
    for prompt, c in zip(prompts[1:], out[1:]):
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = model(ids, mtp=False).logits[0, len(prompt) - 1 : -1]
        lp = logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), lp, atol=1e-4, rtol=0)


def test_int8_drafts_where_a_draft_reads_enough_bytes(monkeypatch):
    """draft_quantize="auto": int8 drafts where the native kernels run and a draft reads at
    least DRAFT_INT8_BYTES (a tiny model's does not); never in exact engines; bad values named."""
    model = random_model(tiny_config())

    def drafts_int8(**kw) -> bool:
        runner = Engine(model, max_batch_size=1, speculative="mtp", **kw).runner
        return runner.draft_weights is not runner.weights

    assert not drafts_int8()
    nbytes = runner_mod.draft_bytes(model)
    assert (
        0 < nbytes < sum(p.nbytes for p in model.mtp[0].parameters()) + model.lm_head.weight.nbytes
    )
    monkeypatch.setattr(runner_mod, "DRAFT_INT8_BYTES", nbytes)
    assert drafts_int8() == (native.kernels() is not None)
    assert not drafts_int8(exact=True)
    assert drafts_int8(draft_quantize="int8", exact=True)  # asked for: the drafts only propose
    monkeypatch.setattr(runner_mod, "DRAFT_INT8_BYTES", nbytes + 1)
    assert not drafts_int8()
    assert not drafts_int8(quantize="int8")  # already int8: the engine's own copies
    with pytest.raises(ValueError, match="draft_quantize"):
        Engine(model, speculative="mtp", draft_quantize="int4")


def test_int8_drafts_follow_weight_updates():
    """A trainer updating the model between generate calls: the int8 draft copies are re-made
    when the MTP module next starts a sequence (its forward from position 0), a one-token
    prompt's too (whose first draft is that forward), and the output stays plain greedy's."""
    model = random_model(tiny_config())
    engine = Engine(model, max_batch_size=1, max_seq_len=64, speculative="mtp",
                    draft_quantize="int8")  # fmt: skip
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine.generate([[5]], params)
    made = engine.runner.draft_weights._made
    with torch.no_grad():
        model.mtp[0].eh_proj.weight.mul_(2.0)
    engine.generate([[5]], params)
    assert engine.runner.draft_weights._made > made
    want = Engine(model, max_batch_size=1, max_seq_len=64).generate([[5]], params)
    assert engine.generate([[5]], params)[0].token_ids == want[0].token_ids


def test_speculative_needs_an_mtp_module():
    model = random_model(tiny_config(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP"):
        Engine(model, speculative="mtp")
    with pytest.raises(ValueError, match="speculative"):
        Engine(model, speculative="eagle")
