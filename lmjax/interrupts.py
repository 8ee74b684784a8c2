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


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


received: list[int] = []  # signals _raise has seen in this process, for errors that hide the Interrupted
_deferring = [False]
_answering = [False]  # inside raise_on_signals: a command that answers signals is running


def _raise(signum, frame):
    received.append(signum)
    if not _deferring[0]:
        raise Interrupted(signum)


def raise_if_received() -> None:
    """Raise the Interrupted that was lost: one raised while Python ran a callback of its own (a
    gc callback such as JAX's, a __del__) is printed and dropped, and the command would carry on.
    Commands call this before they commit anything (a report, a directory) and as they end."""
    if received and _answering[0] and not _deferring[0]:
        raise Interrupted(received[-1])


@contextmanager
def deferred():
    """Hold a signal's Interrupted until the block ends: imports of native libraries (numpy,
    jaxlib) turn an exception raised inside them into an ImportError of their own, print it, or
    swallow it, so heavy imports run here and the signal is answered right after."""
    before = len(received)
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = False
    if len(received) > before:
        raise Interrupted(received[-1])


@contextmanager
def raise_on_signals():
    """SIGINT and SIGTERM raise Interrupted in the main thread while inside (the train loop
    replaces these handlers with its save-then-stop ones while it runs)."""
    received.clear()  # a new command: signals an earlier in-process call answered are not ours
    old = {}
    for sig in STOP_SIGNALS:
        try:
            old[sig] = signal.signal(sig, _raise)
        except ValueError:  # not the main thread: leave signals alone
            pass
    if old:  # delivered now if one arrived while held across a re-execution (signals_held)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _answering[0] = True
    try:
        yield
    finally:
        _answering[0] = False  # library callers of the writers after a command never see its signals
        for sig, handler in old.items():
            signal.signal(sig, handler)


def interrupted_within(error: BaseException) -> int | None:
    """The signal behind `error` when an import or a native extension turned our Interrupted into
    an error of its own (numpy's and jaxlib's ImportError), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted):
            return error.signum
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return received[-1] if received else None


@contextmanager
def signals_held():
    """Block SIGINT and SIGTERM (they stay pending) around os.execve: the blocked mask survives
    it, so a signal in the new process's first moments waits for `raise_on_signals` there
    instead of killing it before a handler exists."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


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
    return (
        f"nothing new was saved; the latest checkpoint is step {step} in "
        f"{Path(run_dir).absolute() / 'checkpoints' / str(step)}; run the same command to resume from it"
    )
