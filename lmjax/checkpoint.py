"""Checkpoints through Orbax's CheckpointManager: async saves, the last N kept plus the best
by held-out loss, each holding the train state and the resolved config.

A checkpoint directory is written under a temporary name and renamed when complete, so a
crash mid-save leaves it invisible; restore passes target shardings, so a checkpoint saved
on one device layout restores onto another.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from lmjax.errors import UserError

logging.getLogger("absl").setLevel(logging.ERROR)


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise UserError(f"no checkpoints in {self.directory.parent}: it has no checkpoints/ directory; train first with `lmjax train EXPERIMENT.py --workdir {self.directory.parent}`")
        preserve = cm.AnyPreservationPolicy([
            cm.LatestN(keep),
            cm.BestN(get_metric_fn=lambda m: m["heldout_loss"], reverse=True, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve, best_fn=lambda m: m["heldout_loss"], best_mode="min",
            cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only,
            enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state: Any, config: dict, heldout_loss: float | None = None, force: bool = False) -> None:
        """Start an async save of the global (unreplicated) state; returns before it is written."""
        metrics = {"heldout_loss": float(heldout_loss)} if heldout_loss is not None else None
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        config=ocp.args.JsonSave(config)),
                          metrics=metrics, force=force)

    def resolve(self, which: str | int) -> int:
        """'latest' | 'best' | a step number → an existing step, or a UserError saying what exists."""
        steps = self.all_steps()
        if not steps:
            raise UserError(f"no checkpoint in {self.directory}; train first, or point at a run directory that has one")
        if which == "latest":
            return steps[-1]
        if which == "best":
            best = self.best_step()
            if best is None:
                raise UserError(f"no checkpoint in {self.directory} has a held-out loss yet; use --checkpoint latest")
            return best
        try:
            step = int(which)
        except ValueError:
            raise UserError(f"--checkpoint must be latest, best or a step number, got '{which}'") from None
        if step not in steps:
            raise UserError(f"no checkpoint at step {step} in {self.directory}; available steps: {', '.join(map(str, steps))}")
        return step

    def _corrupt(self, step: int, error: Exception) -> UserError:
        older = [s for s in self.all_steps() if s < step]
        offer = f"; the previous checkpoint is step {older[-1]}: pass --checkpoint {older[-1]} (or delete {self.directory / str(step)} to resume from it)" if older else ""
        return UserError(f"checkpoint {self.directory / str(step)} is corrupted or incomplete ({type(error).__name__}){offer}")

    def restore_state(self, step: int, target: Any) -> Any:
        """Restore the state at `step` onto `target` (a pytree of ShapeDtypeStruct with shardings)."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
            raise self._corrupt(step, e) from None
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        path = self.directory / str(step) / "config" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise self._corrupt(step, e) from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
