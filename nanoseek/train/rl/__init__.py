"""The RL core: small pieces selected by name, composed into algorithms (docs/rl.md).

    advantages.py       baselines (group mean, leave-one-out) and scales (group/batch std, none)
    policy_loss.py      per-token surrogates (clipped, reinforce) and the k3 KL term
    normalization.py    per-token losses -> one number (token, sequence, constant)
    filters.py          which completions take loss (zero-std groups, truncated completions)
    dynamic_sampling.py sample more rounds until the batch has enough groups with a signal
    algorithms.py       RLConfig, the presets (grpo, dr_grpo, dapo) and their registry
    objective.py        policy loss + normalisation of one micro-batch
    batches.py, logprobs.py, watch.py   the trainer's batches, log-probs and failure warnings

The trainer that drives them is nanoseek/train/grpo.py.
"""
