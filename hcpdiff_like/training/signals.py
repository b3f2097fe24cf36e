"""Stopping well: SIGINT/SIGTERM finish the current step and save; non-finite losses stop or skip.

Every process takes both decisions alike, so DDP ranks never part ways: the stop signal through a tiny
all-reduce, the non-finite check on the loss mean that the trainer already shares between the processes.
"""
from __future__ import annotations

import math
import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _any_process(accelerator, flag: bool) -> bool:
    """True when `flag` is true on at least one process."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    import torch

    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


class StopOnSignal:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second one stops at once."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self.signal_number: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> "StopOnSignal":
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        if self.signal_number is not None:  # second signal: the user means it
            self.uninstall()
            raise KeyboardInterrupt(f"second {signal.Signals(number).name}: stopping without saving")
        self.signal_number, self.signal_name = number, signal.Signals(number).name

    def should_stop(self, accelerator=None) -> bool:
        """Collective: every process asks after each step and all get the same answer."""
        stop = _any_process(accelerator, self.signal_number is not None)
        if stop and self.signal_number is None:  # another rank got the signal
            self.signal_number, self.signal_name = int(signal.SIGTERM), "SIGTERM"
        return stop

    @property
    def exit_code(self) -> int:
        """Shell convention for a run ended by a signal: 128 + signal number (130 SIGINT, 143 SIGTERM)."""
        return 128 + int(self.signal_number or 0)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and where the last good checkpoint is."""


class NonFiniteGuard:
    """`train.on_nonfinite`: `stop` raises before the optimizer step (weights stay the last good ones),
    `skip` drops the step's update. Checked for every micro-batch, decided at the optimizer step."""

    MODES = ("stop", "skip")

    def __init__(self, mode: str = "stop", ckpt_dir=None):
        if mode not in self.MODES:
            from ..config.validation import ConfigError

            raise ConfigError(f"train.on_nonfinite={mode!r}: expected one of {self.MODES}")
        self.mode, self.ckpt_dir = mode, ckpt_dir
        self.pending = False
        self.skipped: list[int] = []

    def skip_update(self, loss: float, step: int, accelerator=None) -> bool:
        """Call after backward, before the optimizer step; True: zero the gradients and skip the update.
        `loss` must be the same on every process (the trainer passes the mean over all of them, in which a
        NaN anywhere is a NaN), so every process decides alike without a collective of its own."""
        bad = not math.isfinite(loss)
        if bad and self.mode == "stop":
            raise NonFiniteLossError(f"non-finite loss ({loss}) at step {step}: training stopped before the "
                                     f"update; the last good checkpoint is in {self.ckpt_dir}. Lower the lr, "
                                     "use train.max_grad_norm, or set train.on_nonfinite=skip")
        self.pending = self.pending or bad
        sync = accelerator is None or accelerator.sync_gradients
        if not (sync and self.pending):
            return False
        self.pending = False
        self.skipped.append(step)
        return True
