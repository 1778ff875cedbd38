"""RL micro-batches: scored completions -> right-padded tensors for the training forward, this
rank's share of them, and the log-probs of a frozen policy (the reference, or pi_old) on them."""

from __future__ import annotations

import math

import torch

from nanoseek.train.rl.logprobs import token_logprobs

IGNORE = -100


def make_batches(rows: list[dict], pad_id: int, batch_size: int, norm: dict) -> list[dict]:
    """Completions -> right-padded micro-batches. A row: prompt ids, completion ids, advantage,
    engine log-probs. labels are the ids on completion tokens, IGNORE elsewhere (the loop counts
    them as the micro-batch's target tokens), so logits[:, t] scores labels[:, t + 1]."""
    batches = []
    for s in range(0, len(rows), batch_size):
        part = rows[s : s + batch_size]
        L = max(len(r["prompt"]) + len(r["completion"]) for r in part)
        ids = torch.full((len(part), L), pad_id, dtype=torch.long)
        labels = torch.full((len(part), L), IGNORE, dtype=torch.long)
        real = torch.zeros(len(part), L, dtype=torch.bool)
        engine_lp = torch.full((len(part), L - 1), float("nan"))
        for b, r in enumerate(part):
            p, c = len(r["prompt"]), len(r["completion"])
            ids[b, : p + c] = torch.tensor(r["prompt"] + r["completion"])
            labels[b, p : p + c] = torch.tensor(r["completion"])
            real[b, : p + c] = True
            if r["logprobs"]:
                engine_lp[b, p - 1 : p - 1 + c] = torch.tensor(r["logprobs"][:c])
        adv = torch.tensor([r["advantage"] for r in part], dtype=torch.float32)
        batches.append(dict(input_ids=ids, labels=labels, token_mask=real, advantages=adv,
                            engine_logp=engine_lp, old_logp=None, ref_logp=None, **norm))  # fmt: skip
    return batches


def rank_batches(rows: list[dict], pad_id: int, batch_size: int, norm: dict, par) -> list[dict]:
    """This rank's micro-batches of the step's rows: rows rank, rank + W, ... in micro-batches of
    batch_size / W. Every rank runs the same number of micro-batches (a sharded forward is a
    collective), so a rank whose share is one row short gets a row with no targets: the loop
    weights a micro-batch by its targets, so it adds nothing."""
    W = par.world_size
    if W == 1:
        return make_batches(rows, pad_id, batch_size, norm)
    b = batch_size // W
    mine = rows[par.rank :: W]
    batches = make_batches(mine, pad_id, b, norm) if mine else []
    most = math.ceil(math.ceil(len(rows) / W) / b)  # micro-batches of the rank with most rows
    while len(batches) < most:
        idle = make_batches(rows[:1], pad_id, 1, norm)[0]
        idle["labels"].fill_(IGNORE)
        batches.append(idle)
    return batches


@torch.no_grad()
def fill_logprobs(model, batches: list[dict], key: str, temperature: float, autocast) -> None:
    """batch[key] = the model's completion log-probs [b, L-1] (the reference's, or the old
    policy's before the first of several updates)."""
    model_was_training = model.training
    model.eval()
    for b in batches:
        with autocast():
            logits = model(b["input_ids"], mtp=False).logits[:, :-1]
        b[key] = token_logprobs(logits, b["labels"][:, 1:].clamp(min=0), temperature)
    model.train(model_was_training)
