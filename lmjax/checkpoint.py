"""Checkpoints through Orbax's CheckpointManager: async saves, the last N kept plus the best
by held-out loss, each holding the train state and the resolved config.

A checkpoint directory is written under a temporary name and renamed when complete, so a
crash mid-save leaves it invisible; an old checkpoint is renamed into `.deleted/` before it
is removed, so a crash mid-delete leaves no half checkpoint in view either. Restore passes
target shardings, so a checkpoint saved on one device layout restores onto another.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from lmjax.errors import UserError

TRASH = ".deleted"  # old checkpoints are renamed here (atomic), then removed
JSON_FILE = "metadata"  # the file of a JSON item (Orbax's default name, given explicitly: messages name it)


class NamedJsonHandler(ocp.handlers.JsonCheckpointHandler):
    """Orbax's JSON item handler whose parse errors name the file read, so that the message
    for a damaged checkpoint points at it (Orbax's own error names no file)."""

    def __init__(self):
        super().__init__(filename=JSON_FILE)

    @classmethod
    def typestr(cls) -> str:  # recorded in each checkpoint: Orbax's own JSON handler reads the item
        return ocp.handlers.JsonCheckpointHandler.typestr()

    def restore(self, directory, item=None, args=None):
        try:
            return super().restore(directory, item, args)
        except ValueError as e:  # json.JSONDecodeError
            e.filename = str(Path(directory) / JSON_FILE)
            raise


def item_handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """What each item of a checkpoint is: the train state (restored whole, or its parameters
    alone by a partial PyTree restore), the resolved config and the tokenizer record (JSON)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state = ocp.handlers.StandardCheckpointHandler()
    registry.add("state", ocp.args.StandardSave, state)
    registry.add("state", ocp.args.StandardRestore, state)
    # Registered for any item, not for "state": a checkpoint records its items' handlers, the ones that saved it.
    registry.add(None, ocp.args.PyTreeRestore, ocp.handlers.PyTreeCheckpointHandler())
    for item in ("config", "tokenizer"):
        json_items = NamedJsonHandler()
        registry.add(item, ocp.args.JsonSave, json_items)
        registry.add(item, ocp.args.JsonRestore, json_items)
    return registry


class CheckpointWriteError(UserError):
    """A checkpoint (or other run file) could not be written: full disk, lost permissions."""


class Checkpoints:
    """A run's Orbax checkpoints: async saves, keep-N by rename, restores onto any device layout."""

    def __init__(self, directory: str | Path, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise UserError(
                f"no checkpoints in {self.directory.parent}: it has no checkpoints/ directory; train first "
                f"with `lmjax train EXPERIMENT.py --workdir {self.directory.parent}`"
            )
        preserve = cm.AnyPreservationPolicy(
            [
                cm.LatestN(keep),
                cm.BestN(
                    get_metric_fn=lambda m: m["heldout_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve,
            best_fn=lambda m: m["heldout_loss"],
            best_mode="min",
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
            todelete_subdir=None if read_only else TRASH,
            enable_async_checkpointing=True,
        )
        self.read_only = read_only
        self.failed = False  # a save failed (reported once)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=item_handlers())
        if not read_only:
            self.purge_deleted()

    def purge_deleted(self) -> None:
        """Remove checkpoints already renamed into .deleted/ (invisible, so a kill here is harmless)."""
        trash = self.directory / TRASH
        if trash.is_dir() and jax.process_index() == 0:
            for child in list(trash.iterdir()):
                shutil.rmtree(child, ignore_errors=True)

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest held-out loss among those kept, or None."""
        return self.manager.best_step()

    def save(
        self,
        step: int,
        state: Any,
        config: dict,
        heldout_loss: float | None = None,
        force: bool = False,
        tokenizer: dict | None = None,
    ) -> None:
        """Start an async save of the global (unreplicated) state; returns before it is written.
        `tokenizer` (kind, vocab_size, fingerprint) lets a restore check the run's tokenizer."""
        self.purge_deleted()
        metrics = {"heldout_loss": float(heldout_loss)} if heldout_loss is not None else None
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if tokenizer is not None:
            items["tokenizer"] = ocp.args.JsonSave(tokenizer)
        try:  # also reports the previous async save, if it failed
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
        except Exception as e:  # a failed write: full disk, lost permissions, ...
            raise self.write_failed(f"could not write a checkpoint in {self.directory}: {write_error(e)}") from None

    def write_failed(self, what: str) -> CheckpointWriteError:
        """The one-line error for a run that cannot write any more (full disk, lost permissions)."""
        self.failed = True
        try:  # Orbax lists a step from the moment its save starts: ask the disk what completed
            self.manager.reload()
        except Exception:  # the error being reported matters more than a stale step list
            pass
        latest = self.latest_step()
        kept = "no checkpoint is complete yet" if latest is None else f"the last complete checkpoint is step {latest}"
        return CheckpointWriteError(
            f"{what}; {kept}. Free disk space (or fix the directory) and run the same command to resume"
        )

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
            raise UserError(
                f"no checkpoint at step {step} in {self.directory}; available steps: {', '.join(map(str, steps))}"
            )
        return step

    def _corrupt(self, step: int, error: Exception) -> UserError:
        older = [s for s in self.all_steps() if s < step]
        where = self.directory / str(step)
        offer = (
            (
                f"; the previous checkpoint is step {older[-1]}: pass --checkpoint {older[-1]} to eval or sample, "
                f"or move {where} out of checkpoints/ to resume training from it"
            )
            if older
            else ""
        )
        return UserError(f"checkpoint {where} is corrupted or incomplete: {unreadable_part(error)}{offer}")

    def _restore(self, step: int, missing_ok: bool = False, **items) -> dict | None:
        """Restore the named items of the checkpoint at `step`; a read failure names what failed.
        With `missing_ok`, a checkpoint saved without one of the items gives None."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # any read failure means an unusable checkpoint
            if missing_ok and isinstance(e, KeyError):  # Orbax's documented error for an absent item
                return None
            raise self._corrupt(step, e) from None

    def restore_state(self, step: int, target: Any) -> Any:
        """Restore the state at `step` onto `target` (a pytree of ShapeDtypeStruct with shardings)."""
        return self._restore(step, state=ocp.args.StandardRestore(target))["state"]

    def restore_params(self, step: int, target: Any) -> Any:
        """Restore only the parameters of the state at `step` onto `target` (ShapeDtypeStructs
        with shardings): eval and sample read no optimizer moments (2x the parameters' memory)."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)  # shapes, dtypes, shardings
        params = ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
        )
        return self._restore(step, state=params)["state"]["params"]

    def restore_config(self, step: int) -> dict:
        """The config saved with checkpoint `step`."""
        return self._restore(step, config=ocp.args.JsonRestore())["config"]

    def restore_tokenizer(self, step: int) -> dict | None:
        """What `save(..., tokenizer=)` stored, or None for a checkpoint saved without it."""
        restored = self._restore(step, missing_ok=True, tokenizer=ocp.args.JsonRestore())
        return None if restored is None else restored["tokenizer"]

    def wait(self) -> None:
        """Block until async saves are written; a failed one raises a UserError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # a failed background write: full disk, lost permissions, ...
            if not self.failed:  # else already reported
                raise self.write_failed(f"could not write a checkpoint in {self.directory}: {write_error(e)}") from None

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:  # already reported by save() or wait()
            if not self.failed:
                raise
        if not self.read_only:
            self.purge_deleted()


def unreadable_part(error: BaseException) -> str:
    """Name what could not be read (array and file) from an Orbax / TensorStore error chain."""
    arrays, files, kind = [], [], type(error).__name__
    while error is not None:
        text = str(error)
        arrays += re.findall(r'Error reading "([^"]+)"', text)
        files += re.findall(r'local file "([^"]+)"', text)
        if getattr(error, "filename", None):
            files.append(str(error.filename))
        error = error.__cause__ or error.__context__
    files = [f for f in files if not f.endswith("/")] or files  # a file over its directory
    if arrays:
        return f"cannot read {arrays[-1]}" + (f" in {files[-1]}" if files else "")
    return f"cannot read {files[-1]} ({kind})" if files else f"it cannot be read ({kind})"


# absl status codes TensorStore reports for a failed write with no OS error text: absl maps
# EFBIG to OUT_OF_RANGE, ENOSPC to RESOURCE_EXHAUSTED, EACCES to PERMISSION_DENIED.
_STATUS_REASONS = {
    "OUT_OF_RANGE": "File too large",
    "RESOURCE_EXHAUSTED": "No space left on device",
    "PERMISSION_DENIED": "Permission denied",
}


def write_error(error: BaseException) -> str:
    """The operating system's reason in an Orbax / TensorStore write failure, and the file."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({error.filename})" if error.filename else error.strerror
    texts = []
    while error is not None and len(texts) < 10:  # the reason may sit in a cause down the chain
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    text = "\n".join(texts)
    reason = re.search(r"([A-Z][\w ]+) \[os_error_code='?\d+'?\]", text)
    file = re.search(r'Failed writing: "([^"]+)"', text) or re.search(r'Error writing "([^"]+)"', text)
    status = re.match(r"([A-Z_]+): ", text)
    if reason or (status and status.group(1) in _STATUS_REASONS):
        why = reason.group(1) if reason else _STATUS_REASONS[status.group(1)]
        return why + (f" writing {file.group(1)}" if file else "")
    return text.splitlines()[0][:300] if text else "unknown error"
