"""Ctrl-C and SIGTERM outside the train loop's own handling (import, tokenization,
compilation, restore, eval, sample): one exception, `Interrupted`, raised in the main thread
and answered by the CLI with one line and status 128 + N.

The CLI then leaves with os._exit: background threads (the batch prefetcher, Orbax's
writers, XLA's compiler) may be inside native code, and tearing the interpreter down under
them crashed the process (SIGSEGV, status 139) instead of exiting 130.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


@contextmanager
def raise_on_signals():
    """SIGINT and SIGTERM raise Interrupted in the main thread while inside (the train loop
    replaces these handlers with its save-then-stop ones while it runs)."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _raise)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def latest_complete_checkpoint(run_dir: Path) -> int | None:
    """The newest finished checkpoint step in RUN_DIR/checkpoints (names that are plain numbers:
    Orbax writes under a temporary name and renames when complete)."""
    ckpts = Path(run_dir) / "checkpoints"
    try:
        steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and p.is_dir()]
    except OSError:
        return None
    return max(steps, default=None)


def what_was_saved(command: str, run_dir: str | None) -> str:
    """The second half of the interrupt line: what is on disk now."""
    if command != "train" or run_dir is None:
        return "nothing was written" if command in ("eval", "export-hf", "import-hf") else "nothing was saved"
    step = latest_complete_checkpoint(Path(run_dir))
    if step is None:
        return f"nothing was saved (no checkpoint in {Path(run_dir).absolute() / 'checkpoints'})"
    return (f"nothing new was saved; the latest checkpoint is step {step} in "
            f"{Path(run_dir).absolute() / 'checkpoints' / str(step)}; run the same command to resume from it")
