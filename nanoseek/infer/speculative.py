"""MTP speculative decoding: the model's own MTP module drafts, the main model verifies.

Shape legend: B rows, k drafts per step, Vocab the vocabulary, D model dim, c catch-up positions.

[V3 §2.2, §5.4.3] the MTP module at position i reads the main model's hidden state h_i
and the embedding of token t_{i+1}, and predicts t_{i+2}. One step for a row whose main cache
holds positions < n and whose last sampled token t_n is still pending:

1. draft: the module runs at the positions it has not seen with true hidden states (usually 1,
   at most k+1: n-1 and the tokens accepted last step), giving q_1 for t_{n+1}; draft d_1 ~ q_1.
   For k > 1 the same module drafts on: at position n+j-2 it reads its own previous output in
   place of the main hidden state (which does not exist yet) and the embedding of d_{j-1}.
2. verify: the main model runs once over [t_n, d_1..d_k] (positions n..n+k) -> p_0..p_k.
3. accept d_j in order with probability min(1, p_{j-1}(d_j) / q_j(d_j)); at the first rejection
   draw a replacement from norm(max(0, p - q)); if all k pass, draw a bonus token from p_k
   [Leviathan et al. 2023, Chen et al. 2023]. Every emitted token is then distributed exactly
   as plain sampling from p would give. Greedy rows use one-hot p and q, which reduces to
   "accept while the draft equals argmax p, then take argmax p": token-for-token plain greedy.
4. roll back: the main cache keeps positions up to n + accepted (entries past it are garbage by
   the cache invariant); the MTP cache keeps only what it computed from true hidden states
   (< n) and catches up on the accepted positions at the next step's first draft.

Only the first MTP module drafts, reused for every draft position (V3 has D = 1).
"""

from __future__ import annotations

import torch

from nanoseek.infer.runner import ModelRunner
from nanoseek.infer.sampling import SamplingBatch


def accept_drafts(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    u: torch.Tensor,
    draw,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling acceptance rule, batched.

    p [B,k+1,Vocab] target probabilities at the k+1 verified positions, q [B,k,Vocab] the draft
    probabilities the drafts came from, drafts [B,k], u [B,k] uniforms in [0,1), `draw(w)` samples
    an index per row proportional to w [B,Vocab]. Returns (accepted [B] in 0..k, next token [B]):
    the accepted drafts are drafts[:, :accepted], followed by the next token.
    """
    B, k = drafts.shape
    rows = torch.arange(B, device=p.device)
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [B,k]
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    ok = u * q_d < p_d  # u < p/q without dividing by a zero q; p >= q always passes
    accepted = ok.long().cumprod(-1).sum(-1)  # [B]: leading run of acceptances
    p_a = p[rows, accepted]  # [B,Vocab]
    q_a = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)[rows, accepted]  # zero after k
    residual = (p_a - q_a).clamp_min_(0)
    # p == q up to rounding leaves nothing: then p itself is the right distribution
    empty = residual.sum(-1, keepdim=True) <= 0
    return accepted, draw(torch.where(empty, p_a, residual))


class MTPSpeculator:
    """Runs draft + verify steps for the engine and keeps each row's MTP catch-up state."""

    def __init__(self, runner: ModelRunner, num_draft: int):
        assert runner.mtp_layer is not None, "build the ModelRunner with mtp=True"
        if num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        self.runner, self.k = runner, num_draft
        self.drafted = [0] * num_draft  # per draft position: drafts made
        self.accepted = [0] * num_draft  # ... and accepted
        self.row_steps = 0  # verify steps summed over rows
        self.emitted = 0  # tokens those steps produced (accepted + 1 each)

    # ------------------------------------------------------------------ statistics
    def acceptance_rates(self) -> list[float]:
        """Fraction of steps in which draft j (1-based position j) was accepted."""
        return [a / d if d else float("nan") for a, d in zip(self.accepted, self.drafted)]

    def tokens_per_step(self) -> float:
        """Mean tokens a row gains per verify step (1 + mean accepted drafts)."""
        return self.emitted / self.row_steps if self.row_steps else float("nan")

    def reset_stats(self) -> None:
        self.drafted, self.accepted = [0] * self.k, [0] * self.k
        self.row_steps = self.emitted = 0

    # ------------------------------------------------------------------ prefill
    def prefill(self, seqs, input_ids: torch.Tensor, h: torch.Tensor, row0: int) -> None:
        """After the main prefill of `seqs` (right-padded input_ids [B,T], hidden h [B,T,D]):
        run the MTP module over positions 0..T-2 (h_i with t_{i+1}), so each row's MTP cache
        is one position behind its main cache. Each seq's first token must be set already."""
        runner, T = self.runner, input_ids.shape[1]
        if T > 1:
            runner.mtp_forward(h[:, : T - 1], input_ids[:, 1:], row0, [0] * len(seqs))
        for b, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            if T > 1:
                runner.mtp_cache.rollback(row0 + b, n - 1)  # the padding is garbage
            else:
                runner.mtp_cache.commit(row0 + b, [0])
            seq.mtp_hidden = h[b, n - 1 : n].clone()  # [c=1,D]: h_{n-1} (not all of h)
            seq.mtp_next = [seq.output_ids[-1]]  # t_n, the pending token

    # ------------------------------------------------------------------ one step
    def step(self, seqs, sb: SamplingBatch):
        """One draft + verify step for rows 0..B-1 (`seqs` in row order). Commits the main and
        MTP cache lengths. Returns (per row: emitted tokens, per row: their log-probs or None)."""
        runner, k = self.runner, self.k
        B = len(seqs)
        dev = runner.model.device
        n = runner.cache.lengths[:B]
        m = runner.mtp_cache.lengths[:B]

        # 1. catch up the MTP cache on positions m..n-1 and draft d_1 (rows padded to c_max).
        # A step is a few small tensors around two forwards: at a small model's ~0.3 ms a
        # forward every extra operator shows, so lists stay lists where they can
        counts = [len(s.mtp_next) for s in seqs]
        c_max = max(counts)
        if min(counts) == c_max:  # every row's last position is the last: only its output
            h_in = torch.stack([s.mtp_hidden for s in seqs])  # [B,c,D]
            ids_in = torch.tensor([s.mtp_next for s in seqs], device=dev)
            logits, g = runner.mtp_forward(h_in, ids_in, 0, list(m), last_only=True)
            q_logits, g_last = logits[:, -1], g[:, -1]  # [B,Vocab], [B,D]
        else:
            D = seqs[0].mtp_hidden.shape[-1]
            h_in = torch.zeros(B, c_max, D, dtype=runner.model.dtype, device=dev)
            ids_in = torch.tensor([s.mtp_next + [0] * (c_max - len(s.mtp_next)) for s in seqs],
                                  device=dev)  # fmt: skip
            for b, s in enumerate(seqs):
                h_in[b, : counts[b]] = s.mtp_hidden
            rows, last = torch.arange(B, device=dev), torch.tensor(counts, device=dev) - 1
            logits, g = runner.mtp_forward(h_in, ids_in, 0, list(m))
            q_logits, g_last = logits[rows, last], g[rows, last]
        for b in range(B):
            runner.mtp_cache.rollback(b, n[b])  # true entries only (rows were padded to c_max)

        drafts, qs = [], []
        for j in range(k):
            if sb.all_greedy:
                d = q_logits.argmax(-1)
            else:
                q = sb.probs(q_logits)
                d = sb.draw(q)
                qs.append(q)
            drafts.append(d)
            if j + 1 < k:  # draft further with the module's own hidden state
                start = [n[b] + j for b in range(B)]
                logits, g = runner.mtp_forward(g_last[:, None], d[:, None], 0, start)
                q_logits, g_last = logits[:, 0], g[:, 0]
        drafts = torch.stack(drafts, dim=1)  # [B,k]
        if k > 1:  # the drafts' own entries are not kept
            for b in range(B):
                runner.mtp_cache.rollback(b, n[b])

        # 2. verify all drafts with one main forward over [t_n, d_1..d_k]
        d_list = drafts.tolist()
        verify = torch.tensor([[s.output_ids[-1]] + d for s, d in zip(seqs, d_list)], device=dev)
        p_logits, h = runner.decode(verify, list(n))

        # 3. accept: greedy rows while the draft is the argmax, then the argmax
        target = p_logits.argmax(-1).tolist()  # [B][k+1]
        acc = [next((j for j in range(k) if d[j] != t[j]), k) for d, t in zip(d_list, target)]
        toks = [d[:a] + [t[a]] for d, t, a in zip(d_list, target, acc)]
        if not sb.all_greedy:
            p = torch.stack([sb.probs(p_logits[:, j]) for j in range(k + 1)], dim=1)
            acc_s, nxt_s = accept_drafts(p, torch.stack(qs, 1), drafts, sb.uniform(k, dev), sb.draw)
            for b, (a, t) in enumerate(zip(acc_s.tolist(), nxt_s.tolist())):
                if not sb.greedy_rows[b]:
                    acc[b], toks[b] = a, d_list[b][:a] + [t]
        lps = None
        if sb.want_logprobs:  # rows padded to k+1 tokens with their last
            padded = torch.tensor([t + t[-1:] * (k + 1 - len(t)) for t in toks], device=dev)
            lps = sb.token_logprobs(p_logits, padded).tolist()

        # 4. commit: main cache keeps t_n, d_1..d_a; the MTP state gets h_n..h_{n+a}
        out_tokens, out_lps = [], []
        for b, s in enumerate(seqs):
            a = acc[b]
            runner.cache.rollback(b, n[b] + a + 1)  # verify committed n + k + 1
            s.mtp_hidden = h[b, : a + 1]
            s.mtp_next = toks[b][: a + 1]
            out_tokens.append(toks[b][: a + 1])
            out_lps.append(lps[b][: a + 1] if lps is not None else None)
            for j in range(k):
                self.drafted[j] += 1
                self.accepted[j] += int(j < a)
            self.emitted += a + 1
        self.row_steps += B
        return out_tokens, out_lps
