"""The run directory (`--out`) of a trainer: one run per directory, logs that match it.

- A trainer started without `resume` into a directory that holds a previous run stops with a
  one-line error, unless `overwrite` asks to clear that run first: checkpoints are pruned by
  step number, so an old run's later steps would outrank (and delete) the new run's, metrics
  would interleave, and a later resume would pick up the old run.
- On resume the newest checkpoint that reads whole is the one resumed; newer broken ones
  (a torn trainer state, a truncated weight file or DCP shard) are set aside as
  `step-N.corrupt` with a warning, and a run whose checkpoints are all broken is an error,
  never a silent restart from step 0.
- On resume the per-step logs (metrics.jsonl, completions.jsonl) are cut back to the resumed
  step, so after any sequence of kills they hold exactly one row per step; a line torn by a
  kill mid-write is dropped with a warning naming the file.
- Staging folders left by saves killed mid-write are removed at start (an aside copy of a
  checkpoint whose replacement never landed is put back instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Any

from safetensors import safe_open

from nanoseek.checkpoint.io import CheckpointError, weight_map
from nanoseek.checkpoint.trainer_state import load_state, step_dirs
from nanoseek.config import ConfigError
from nanoseek.dist.checkpoint import SHARDS, is_sharded
from nanoseek.dist.safe_dcp import check_shards

# what a training run writes and a new run must not mix with; cleared by `overwrite`
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "completions.jsonl", "model")
# sequence distillation's teacher data and starting student (rebuilt by a fresh run)
_ALSO_CLEARED = ("teacher_samples.jsonl", "teacher_samples.json", "student_init")

# staging names: nanoseek/checkpoint/io.py (`<dir>.tmp-<pid>-<hex>`, `<dir>.old-<pid>-<hex>`),
# nanoseek/checkpoint/trainer_state.py (`.state-<pid>`),
# nanoseek/dist/checkpoint.py (`.step-N.partial`)
_TMP = re.compile(r"^(?P<final>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")
_OLD = re.compile(r"^(?P<final>.+)\.old-(?P<pid>\d+)-[0-9a-f]+$")
_STATE = re.compile(r"^\.state-(?P<pid>\d+)$")
_PARTIAL = re.compile(r"^\.step-\d+\.partial$")
SET_ASIDE = ".corrupt"  # step-N.corrupt: a checkpoint resume skipped, kept for inspection


def previous_run(out: str) -> list[str]:
    """The run outputs present in `out` (empty: no previous run there)."""
    found = []
    for name in RUN_OUTPUTS:
        path = os.path.join(out, name)
        if name == "checkpoints":
            if os.path.isdir(path) and any(n.startswith("step-") for n in os.listdir(path)):
                found.append(name)
        elif os.path.exists(path):
            found.append(name)
    return found


def claim_out_dir(out: str, resume: bool, overwrite: bool, par=None) -> None:
    """Make `out` this run's: refuse or (with `overwrite`) clear a previous run when not
    resuming, and remove staging folders of killed saves. Rank 0 decides and acts; under
    torchrun the other ranks fail with its error."""
    if resume and overwrite:
        raise ConfigError(
            "options 'resume' and 'overwrite' exclude each other: resume continues the run in "
            f"{out}, overwrite deletes it"
        )

    def claim() -> None:
        found = [] if resume else previous_run(out)
        if found and not overwrite:
            raise ConfigError(
                f"{out}: holds a previous run ({', '.join(found)}); continue it with --resume, "
                "replace it with --overwrite, or choose another --out"
            )
        for name in (*found, *_ALSO_CLEARED) if found else ():
            _remove(os.path.join(out, name))
        clean_staging(out)

    if par is None:
        claim()
    else:
        par.on_main(claim)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _alive(pid: int) -> bool:
    """Another live process (its staging folder may be in use); ours, or none, is not."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_staging(out: str) -> list[str]:
    """Remove the staging folders of saves killed mid-write under `out` and `out/checkpoints`;
    returns what was removed or restored."""
    done = []
    for parent in (out, os.path.join(out, "checkpoints")):
        if not os.path.isdir(parent):
            continue
        for name in sorted(os.listdir(parent)):
            path = os.path.join(parent, name)
            m = _TMP.match(name) or _OLD.match(name) or _STATE.match(name)
            if m and _alive(int(m["pid"])):
                continue
            if m and m.re is _OLD:
                final = os.path.join(parent, m["final"])
                if not os.path.lexists(final):  # killed between its two renames: put it back
                    os.rename(path, final)
                    done.append(final)
                    continue
            if m or _PARTIAL.match(name) or name.endswith(".jsonl.tmp"):
                _remove(path)
                done.append(path)
    return done


def truncate_jsonl(path: str, step: int) -> None:
    """Keep the lines of a per-step JSONL log (metrics, completions) up to `step`: those after
    it were written after the checkpoint a run resumes from. A torn last line (a kill mid-write)
    is dropped with a warning; a malformed line elsewhere is an error naming file and line."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    kept = []
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = row.get("step", 0) if isinstance(row, dict) else None
        except (ValueError, RecursionError):
            row_step = None
        if not isinstance(row_step, (int, float)):
            if all(not rest.strip() for rest in raw[i + 1 :]):
                warnings.warn(f"{path}: dropped a torn last line (line {i + 1})", stacklevel=2)
                continue
            raise ValueError(f"{path}: line {i + 1} is not a JSON object with a 'step'")
        if row_step <= step:
            kept.append(line + b"\n")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_weights(path: str) -> None:
    """Cheap checks that a checkpoint's weights are whole: every safetensors header reads and
    covers its file, or every DCP shard named by the index is there at full length."""
    if is_sharded(path) or os.path.isdir(os.path.join(path, SHARDS)):
        check_shards(os.path.join(path, SHARDS))
        return
    for file in sorted(set(weight_map(path).values())):  # paths inside `path`
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
            raise CheckpointError(f"{file}: corrupt or truncated ({e})") from None


def resumable_checkpoint(out_dir: str) -> tuple[str, dict[str, Any]] | None:
    """(path, trainer state) of the newest checkpoint in `out_dir` that reads whole; None when
    there is none. Newer ones that do not are set aside as `step-N.corrupt`, with a warning
    saying why (else they would outrank the resumed run's own checkpoints); when every
    checkpoint is broken this is an error rather than a silent restart from step 0."""
    skipped: list[tuple[str, str]] = []
    for _, path in reversed(step_dirs(out_dir)):
        try:
            state = load_state(path)
            check_weights(path)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            continue
        for bad, why in skipped:
            aside = bad + SET_ASIDE
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(bad, aside)
            warnings.warn(f"skipped checkpoint {bad} (set aside as {aside}): {why}", stacklevel=2)
        return path, state
    if skipped:
        reasons = "; ".join(why for _, why in skipped)
        raise CheckpointError(
            f"{os.path.join(out_dir, 'checkpoints')}: no intact checkpoint to resume from "
            f"({reasons}); move them away, or start afresh with --overwrite"
        )
    return None
