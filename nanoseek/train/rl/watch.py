"""The classic RL failures, watched: the format reward stuck at 0 (a template mismatch),
every completion truncated, no group with a signal. Each warns once per streak of steps."""

from __future__ import annotations


class Watch:
    """Counts consecutive steps of the classic GRPO failures and warns once per streak."""

    def __init__(self, warn_after: int):
        self.warn_after = warn_after
        self.streaks = {"format_zero": 0, "all_truncated": 0, "no_signal": 0}

    def update(self, m: dict, opts) -> list[str]:
        fmt = [v for k, v in m.items() if k.startswith("rewards/format") and k.endswith("/mean")]
        conditions = {
            "format_zero": bool(fmt) and max(fmt) == 0.0,
            "all_truncated": m["completions/clipped_ratio"] == 1.0,
            "no_signal": m["frac_reward_zero_std"] == 1.0,
        }
        limits = {"format_zero": self.warn_after, "all_truncated": min(3, self.warn_after),
                  "no_signal": self.warn_after}  # fmt: skip
        out = []
        for name, hit in conditions.items():
            self.streaks[name] = self.streaks[name] + 1 if hit else 0
            if self.streaks[name] == limits[name]:
                out.append(self._message(name, limits[name], m, opts))
        return out

    @staticmethod
    def _message(name: str, n: int, m: dict, opts) -> str:
        if name == "format_zero":
            return (
                f"the format reward has been 0 for {n} steps: no completion has the "
                "'<think>...</think> <answer>...</answer>' shape. Usually the prompt template "
                f"or prefill differs from what the model was trained on (template="
                f"{opts.template!r}, prefill={opts.prefill}; the built-in corpus uses 'short' with "
                "a prefilled <think>, `nanoseek sft` models use 'chat'), or the model never "
                "learnt the format: cold-start it with SFT first"
            )
        if name == "all_truncated":
            return (
                f"every completion hit max_completion_length={opts.max_completion_length} for "
                f"{n} steps: none reached its answer, so rewards are 0; raise "
                "max_completion_length (or check that the model stops at eos)"
            )
        return (
            f"no group had different rewards for {n} steps (mean reward {m['reward']:.3f}): all G "
            "completions of each prompt score the same, so every advantage is 0 and nothing is "
            "learnt. The problems are too hard (reward 0) or too easy (reward 1) for this model: "
            "change task_level, or raise num_generations"
        )

    def state_dict(self) -> dict:
        return dict(self.streaks)

    def load_state_dict(self, state: dict) -> None:
        self.streaks.update(state)
