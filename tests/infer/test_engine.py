"""The engine: continuous batching, streaming deltas, stop ids and strings, aborts, errors."""

import threading

import pytest
import torch

from nanoseek.infer import Engine, SamplingParams
from tests.helpers import random_model, tiny_config

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?"


class CharTokenizer:
    """One character per id (ids 0-2 are bos/eos/pad, dropped with skip_special_tokens)."""

    bos_id, eos_id = 0, 1

    def decode(self, ids, skip_special_tokens=False):
        return "".join(
            "" if i < 3 and skip_special_tokens else ALPHABET[i % len(ALPHABET)] for i in ids
        )

    def encode(self, text, add_bos=False):
        return [self.bos_id] * add_bos + [ALPHABET.index(ch) + 3 * len(ALPHABET) for ch in text]


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config())


def greedy(model, prompt, n=20, **kw):
    engine = Engine(model, max_batch_size=1, max_seq_len=64)
    return engine.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True, **kw))[0]


def test_stop_token_id_ends_the_request_and_is_kept(model):
    full = greedy(model, [5, 6, 7]).token_ids
    stop = full[6]
    first = full.index(stop)
    got = greedy(model, [5, 6, 7], stop_token_ids=[stop])
    assert got.token_ids == full[: first + 1] and got.finish_reason == "stop"


def test_eos_stops_unless_ignored(model):
    full = greedy(model, [5, 6, 7]).token_ids
    engine = Engine(model, max_batch_size=1, max_seq_len=64)
    engine.eos_ids = frozenset([full[4]])
    got = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=20))[0]
    assert got.token_ids == full[: full.index(full[4]) + 1] and got.finish_reason == "stop"
    got = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert got.token_ids == full and got.finish_reason == "length"


def test_stop_string_cuts_the_text_and_streams_nothing_of_it(model):
    tok = CharTokenizer()
    engine = Engine(model, tok, max_batch_size=1, max_seq_len=64)
    full = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    text = full.text
    assert len(text) == 20  # no special ids produced by this prompt's greedy path
    stop = text[8:11]  # spans three tokens
    cut = text.index(stop)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, stop=[stop, "never"])
    deltas = list(engine.stream([[5, 6, 7]], params))
    assert "".join(d.text for d in deltas) == text[:cut]
    assert deltas[-1].finish_reason == "stop"
    # the tokens up to the one completing the stop string are reported
    assert sum(len(d.token_ids) for d in deltas) == cut + len(stop)
    assert not any(stop in d.text for d in deltas)


def test_stream_deltas_add_up_to_the_completion(model):
    engine = Engine(model, CharTokenizer(), max_batch_size=2, max_seq_len=64)
    prompts = [[5, 6, 7], [8, 9]]
    params = SamplingParams(
        max_new_tokens=9, temperature=1.0, seed=1, logprobs=True, ignore_eos=True
    )
    want = engine.generate(prompts, params)
    got = {}
    for d in engine.stream(prompts, params):
        ids, text, lps = got.get(d.request_id, ([], "", []))
        got[d.request_id] = (ids + d.token_ids, text + d.text, lps + d.logprobs)
        assert len(d.token_ids) <= 2  # plain decoding: prefill token + one decode token
    for c, (ids, text, lps) in zip(want, got.values()):  # ids in order of arrival
        assert (ids, text, lps) == (c.token_ids, c.text, c.logprobs)
        assert c.finish_reason == "length" and len(ids) == 9


def test_requests_joining_a_running_batch_get_their_solo_output(model):
    """Continuous batching: B joins while A runs, C waits for a free row; each output equals
    the request decoded alone (greedy)."""
    prompts = {"a": [5, 6, 7, 8], "b": [9, 10], "c": [11, 12, 13]}
    solo = {k: greedy(model, p, n=12).token_ids for k, p in prompts.items()}
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    out = {k: [] for k in prompts}
    engine.add_request(prompts["a"], params, request_id="a")
    for step in range(40):
        if step == 3:
            engine.add_request(prompts["b"], params, request_id="b")
            engine.add_request(prompts["c"], params, request_id="c")  # queued: 2 rows only
        for d in engine.step():
            out[d.request_id] += d.token_ids
        assert len(engine.running) <= 2
        if not engine.has_unfinished():
            break
    assert out == solo


def test_abort_finishes_one_request_and_leaves_the_other(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    engine.add_request([5, 6, 7], params, request_id="keep")
    engine.add_request([8, 9], params, request_id="drop")
    out, reasons = {"keep": [], "drop": []}, {}
    for step in range(20):
        if step == 2:
            engine.abort("drop")
        for d in engine.step():
            out[d.request_id] += d.token_ids
            if d.finished:
                reasons[d.request_id] = d.finish_reason
        if not engine.has_unfinished():
            break
    assert reasons == {"keep": "length", "drop": "abort"}
    assert out["keep"] == greedy(model, [5, 6, 7], n=10).token_ids
    assert len(out["drop"]) == 3  # step 0: prefill + decode, step 1: decode, then aborted


def test_leaving_a_stream_early_leaves_the_engine_idle(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    for _ in engine.stream([[5, 6], [7, 8]], SamplingParams(max_new_tokens=10)):
        break
    assert not engine.has_unfinished()
    assert engine.generate([[5, 6]], SamplingParams(max_new_tokens=3))[0].token_ids


def test_greedy_logprobs_match_a_recompute(model):
    got = greedy(model, [5, 6, 7], n=8, logprobs=True)
    ids = torch.tensor([[5, 6, 7] + got.token_ids])
    with torch.no_grad():
        lp = model(ids, mtp=False).logits[0, 2:-1].log_softmax(-1)
    want = lp.gather(-1, ids[0, 3:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(got.logprobs), want, atol=1e-4, rtol=0)


def test_add_request_from_another_thread(model):
    engine = Engine(model, max_batch_size=4, max_seq_len=64)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    threads = [
        threading.Thread(target=engine.add_request, args=([5 + i, 6], params, f"t{i}"))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = set()
    while engine.has_unfinished():
        done |= {d.request_id for d in engine.step() if d.finished}
    assert done == {"t0", "t1", "t2", "t3"}


@pytest.mark.parametrize(
    "prompt, params, words",
    [
        (list(range(3, 63)), SamplingParams(max_new_tokens=10), ["max_seq_len", "60"]),
        ("hello", SamplingParams(), ["tokenizer"]),
        ([5, 6], SamplingParams(max_new_tokens=5, stop=["x"]), ["stop strings", "tokenizer"]),
        ([], SamplingParams(), ["empty"]),
        ([5, 500], SamplingParams(), ["vocabulary"]),
        ([5], SamplingParams(top_p=2.0), ["top_p"]),
    ],
)
def test_bad_requests_raise_value_errors_naming_the_problem(model, prompt, params, words):
    engine = Engine(model, max_batch_size=1, max_seq_len=64)
    with pytest.raises(ValueError) as e:
        engine.add_request(prompt, params)
    for w in words:
        assert w in str(e.value)
    assert not engine.has_unfinished()


def test_duplicate_request_id_is_refused(model):
    engine = Engine(model, max_batch_size=1, max_seq_len=64)
    engine.add_request([5], SamplingParams(max_new_tokens=5), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([6], SamplingParams(max_new_tokens=5), request_id="x")


def test_text_prompt_with_tokenizer(model):
    engine = Engine(model, CharTokenizer(), max_batch_size=1, max_seq_len=64)
    got = engine.generate(["abc"], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert got.prompt_ids == [0] + CharTokenizer().encode("abc") and len(got.token_ids) == 4


def test_a_model_in_training_mode_is_left_in_training_mode(model):
    """GRPO generates with the policy it trains: the engine must not flip its mode or count
    rollout tokens in the MoE balance statistics."""
    model.train()
    for moe in model.moe_layers():
        moe.count_load = True
    try:
        engine = Engine(model, max_batch_size=1, max_seq_len=32)
        got = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert model.training
        assert all(int(moe.expert_load.sum()) == 0 for moe in model.moe_layers())
    finally:
        for moe in model.moe_layers():
            moe.count_load = False
        model.eval()
    assert got[0].token_ids == greedy(model, [5, 6, 7], n=6).token_ids
