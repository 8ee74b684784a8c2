"""Stopping on a signal: SIGTERM or SIGINT ends training after the current step, saved, on
every process at the same step."""

from __future__ import annotations

import os
import signal

import jax

from lmjax.checkpoint import Checkpoints


def _preemption_service() -> bool:
    """Whether JAX's preemption service runs: jax.distributed with several processes starts it
    unless the jax_enable_preemption_service option is off."""
    return (
        jax.process_count() > 1 and jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)
    )


class StopSignals:
    """SIGTERM / SIGINT → stop after the current step, save, exit.

    One process: a handler sets a flag the loop checks after each step. Several processes must
    all stop at the same step, or the others hang in a collective: JAX's preemption service
    (started by jax.distributed.initialize) owns SIGTERM and agrees on a step across processes,
    which Orbax's `reached_preemption` reports; SIGINT is forwarded to it as SIGTERM.
    """

    def __init__(self, ckpts: Checkpoints):
        self.ckpts = ckpts
        self.received = None
        self.synced = _preemption_service()
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum
        if self.synced and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_at(self, step: int) -> bool:
        """Call after every step (on every process): True where all should save and stop."""
        if self.synced:
            if self.ckpts.manager.reached_preemption(step):
                self.received = self.received or signal.SIGTERM
                return True
            return False
        return self.received is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
