"""`--compile`: the training forward and backward compiled per layer kind, no graph breaks, a
bounded number of graphs, evaluation and generation eager (nanoseek/model/compile.py).

Most tests compile with the `aot_eager` backend: dynamo and AOTAutograd trace forward and
backward exactly as for inductor - the graph breaks, guards and recompiles are theirs - without
inductor's C++ build (minutes on a loaded 2-core machine). The test marked slow compiles with
inductor and checks the compiled step against the eager one.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from torch._dynamo.utils import counters

import nanoseek.model.compile as compile_mod
from nanoseek.model.compile import TrainingCompiler
from nanoseek.model.grouped_mm import grouped_mm
from nanoseek.model.mtp_objective import label_targets, mtp_objective
from nanoseek.train.pretrain import PretrainOptions, run_pretrain
from tests.helpers import random_model, tiny_config
from tests.train.test_grpo import _opts as grpo_opts
from tests.train.test_grpo import model_dir, tok_dir  # noqa: F401  (fixtures)

B, T = 2, 16


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(mtp_depths: int = 2, **overrides):
    cfg = tiny_config(num_nextn_predict_layers=mtp_depths, aux_loss_alpha=1e-4, seq_aux=True,
                      **overrides)  # fmt: skip
    model = random_model(cfg).train()
    for moe in model.moe_layers():
        moe.count_load = True
    return model


def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_forward(model, ids, precision, compiled=contextlib.nullcontext, token_mask=None):
    """The trainers' step: forward under autocast (compiled layers inside), loss, backward."""
    with _autocast(precision), compiled():
        out = model(ids, mtp=True, token_mask=token_mask)
        obj = mtp_objective(out.logits, out.mtp_logits, label_targets(ids), 0.3, out.aux_loss)
    obj.loss.backward()
    return obj


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_step_compiles_whole_one_graph_per_layer_kind(precision):
    """Dense layer, MoE layers (routing, grouped experts, load counts, balance loss) and two MTP
    depths, forward and backward: no graph break, one graph per layer kind and shape, and no
    recompilation on later steps (a new graph per step would mean eager past the limit)."""
    model = _model()
    compiler = TrainingCompiler(model, backend="aot_eager")
    ids = torch.randint(
        0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)
    )
    _train_forward(model, ids, precision, compiler)
    # dense (T), MoE (T, shared by both MoE layers), MTP depth 1 (T-1) and depth 2 (T-2); the
    # cross-entropy on the main logits (B*T rows) and on each depth's (B*(T-k))
    assert _graphs() == 4 + 3
    for seed in (1, 2):
        model.zero_grad()
        ids = torch.randint(
            0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed)
        )
        _train_forward(model, ids, precision, compiler)
    assert _graphs() == 4 + 3
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["aot_autograd"]["ok"] == 4 + 3  # forward and backward of each graph traced
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_aot_compiled_step_matches_eager_with_padding_mask():
    """Same loss, gradients, expert loads as the eager step (fp32: the traced graphs run the same
    kernels), with a padding mask as SFT and distillation pass."""
    ids = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 11:] = False
    runs = []
    for compiled in (False, True):
        model = _model()
        compiler = (
            TrainingCompiler(model, backend="aot_eager") if compiled else contextlib.nullcontext
        )
        obj = _train_forward(model, ids, "fp32", compiler, token_mask=mask)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        loads = [m.expert_load.clone() for m in model.moe_layers()]
        runs.append((obj.loss.detach(), grads, loads))
    (loss_e, grads_e, loads_e), (loss_c, grads_c, loads_c) = runs
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(loads_c, loads_e):
        assert torch.equal(a, b)
    assert sum(int(x.sum()) for x in loads_e[:1]) == 2 * int(mask.sum())  # real tokens x top-k


def test_past_max_variants_fails_instead_of_running_eager():
    """A run whose shapes keep changing raises at `max_variants` graphs: no silent fallback."""
    model = _model(mtp_depths=0, num_hidden_layers=1, first_k_dense_replace=1)  # one dense layer
    compiler = TrainingCompiler(model, max_variants=2, backend="aot_eager")
    for t in (8, 12):
        _train_forward(model, torch.randint(0, 97, (B, t)), "bf16", compiler)
    with pytest.raises(Exception, match="(?i)limit"):
        _train_forward(model, torch.randint(0, 97, (B, 20)), "bf16", compiler)


def test_evaluation_and_generation_run_the_eager_modules():
    """Outside the training block the layers are the eager ones: an eval forward at a new shape
    and a generation compile nothing, and the compiled step afterwards still reuses its graphs."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams

    model = _model(mtp_depths=1)
    compiler = TrainingCompiler(model, backend="aot_eager")
    ids = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(4))
    _train_forward(model, ids, "bf16", compiler)
    graphs = _graphs()
    assert all(layer._compiled_call_impl is None for layer in compiler.layers)
    model.eval()
    with torch.no_grad():
        logits = model(ids[:1, :5]).logits
        eager = model(ids[:1, :5]).logits
    assert torch.equal(logits, eager)
    Engine(model, max_batch_size=1, max_seq_len=32).generate(
        [[1, 2, 3]], SamplingParams(max_new_tokens=4)
    )
    assert _graphs() == graphs
    model.train()
    _train_forward(model, ids, "bf16", compiler)
    assert _graphs() == graphs and not counters["graph_break"]


def test_grouped_mm_custom_op_equals_autograd_of_grouped_mm():
    """The fp32 custom op (what compiled code calls) and its backward, bit for bit."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(4, 48, 32, generator=g, requires_grad=True)
    offs = torch.tensor([16, 16, 40, 64], dtype=torch.int32)  # an empty block too
    ref = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    dy = torch.randn(ref.shape, generator=g)
    gx, gw = torch.autograd.grad(ref, (x, w), dy)
    out = grouped_mm(x, w.transpose(1, 2), offs)
    cx, cw = torch.autograd.grad(out, (x, w), dy)
    assert torch.equal(out, ref) and torch.equal(cx, gx) and torch.equal(cw, gw)


def _pretrain_opts(tmp_path, name, **kw) -> PretrainOptions:
    cfg_path = tmp_path / "model.json"
    if not cfg_path.exists():
        tiny_config(vocab_size=512, num_hidden_layers=2, max_position_embeddings=128
                    ).save_pretrained(tmp_path)  # fmt: skip
        os.replace(tmp_path / "config.json", cfg_path)
    base = dict(
        out=str(tmp_path / name), model=str(cfg_path), corpus_docs=300, vocab_size=512,
        seq_len=32, batch_size=4, max_steps=3, warmup_steps=1, eval_every=3, eval_batches=1,
        save_every=3, precision="bf16", plot=False,
    )  # fmt: skip
    return PretrainOptions(**(base | kw))


def _records(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_pretrain_compile_option_trains_like_eager_and_reports_compile_time(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    run_pretrain(_pretrain_opts(tmp_path, "eager"), progress=False)
    run_pretrain(_pretrain_opts(tmp_path, "compiled", compile=True), progress=False)
    eager, compiled = _records(str(tmp_path / "eager")), _records(str(tmp_path / "compiled"))
    assert "compiled in " in capsys.readouterr().err
    assert compiled[0]["compile_s"] > 0 and "compile_s" not in compiled[1]
    for e, c in zip(eager, compiled):
        assert c["loss"] == pytest.approx(e["loss"], rel=2e-2)
    assert compiled[-1]["val_loss"] == pytest.approx(eager[-1]["val_loss"], rel=2e-2)
    assert not counters["graph_break"]


@pytest.mark.slow
def test_inductor_compiled_bf16_step_matches_eager():
    """The real backend: a bf16 autocast step with MTP and MoE, loss and gradients close to the
    eager step's (inductor fuses the element-wise work, so bf16 roundings differ slightly)."""
    ids = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(6))
    runs = []
    for compiled in (False, True):
        model = _model(mtp_depths=1)
        compiler = TrainingCompiler(model) if compiled else contextlib.nullcontext
        obj = _train_forward(model, ids, "bf16", compiler)
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        runs.append((obj.loss.detach(), grad))
    (loss_e, grad_e), (loss_c, grad_c) = runs
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-2, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(grad_c, grad_e, dim=0)
    assert cos > 0.999, cos
    # dense, MoE, MTP depth 1, and the cross-entropy on the main and the depth-1 logits
    assert not counters["graph_break"] and _graphs() == 3 + 2


def test_varying_lengths_share_bucketed_graphs_and_match_eager():
    """RL micro-batches (`varying_shapes`): 1-3 rows of 10-100 tokens run padded to 3 rows and
    multiples of 64 tokens, two graphs per layer kind, with the unpadded call's logits, expert
    loads and (sequence-wise, a mean over rows) balance loss."""
    model = _model(mtp_depths=0)
    compiler = TrainingCompiler(model, backend="aot_eager", varying_shapes=True)
    g = torch.Generator().manual_seed(7)
    for rows, t in ((3, 10), (2, 37), (3, 64), (1, 70), (3, 100)):
        ids = torch.randint(0, 97, (rows, t), generator=g)
        mask = torch.ones(rows, t, dtype=torch.bool)
        mask[-1, t // 2 :] = False
        outs = []
        for compiled in (contextlib.nullcontext, compiler):
            for moe in model.moe_layers():
                moe.expert_load.zero_()
            with compiled():
                out = model(ids, mtp=False, token_mask=mask)
            outs.append((out, [m.expert_load.clone() for m in model.moe_layers()]))
        (eager, loads_e), (comp, loads_c) = outs
        assert comp.logits.shape == eager.logits.shape == (rows, t, 97)
        torch.testing.assert_close(comp.logits, eager.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(comp.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-8)
        assert all(torch.equal(a, b) for a, b in zip(loads_c, loads_e))
    assert _graphs() == 4  # dense and MoE, at 64 and 128 tokens
    assert not counters["graph_break"]


def test_compile_with_fp8_is_refused_before_any_work():
    from nanoseek.train.loop import LoopOptions, Trainer

    opts = LoopOptions(precision="fp8", compile=True)
    with pytest.raises(ValueError, match="compile"):
        Trainer(_model(), opts, loss_fn=None, train_data=None)


def test_grpo_compile_runs_varying_completions_on_bucketed_graphs(model_dir, tmp_path, monkeypatch):  # noqa: F811
    """GRPO (fp32, completions of changing length, several micro-batches per step): the first
    update's loss equals the eager run's, every step trains, no graph break, graphs bounded by
    layer kinds x length buckets x micro-batch sizes."""
    from nanoseek.train.grpo import run_grpo

    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    run_grpo(grpo_opts(model_dir, tmp_path / "eager", eval_every=0), progress=False)
    run_grpo(
        grpo_opts(model_dir, tmp_path / "compiled", eval_every=0, compile=True), progress=False
    )
    eager, compiled = _records(str(tmp_path / "eager")), _records(str(tmp_path / "compiled"))
    assert len(compiled) == len(eager) == 3
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-4, abs=1e-6)
    assert compiled[0]["compile_s"] > 0
    assert not counters["graph_break"]
    # dense + MoE, one 64-token bucket: the smaller last micro-batches are padded to 3 rows
    assert _graphs() == 2


def test_a_later_run_in_the_process_starts_with_its_own_limit():
    """Trainers run one after another in one process (pipeline, main job): the graphs of an
    earlier run do not count against the next run's max_variants."""
    for t in (8, 12, 16):
        model = _model(mtp_depths=0, num_hidden_layers=1, first_k_dense_replace=1)
        compiler = TrainingCompiler(model, max_variants=1, backend="aot_eager")
        _train_forward(model, torch.randint(0, 97, (B, t)), "bf16", compiler)
    assert not counters["graph_break"]
