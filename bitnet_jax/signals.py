"""Stop requests: SIGTERM and Ctrl-C end a single-process run at the next step boundary, saved."""

from __future__ import annotations

import os
import signal
import threading
import time


class StopRequest:
    """SIGTERM / SIGINT set a flag that the train loop checks between steps (the handler never saves:
    the loop saves the current step, waits for it, and exits 0). A second SIGINT raises
    KeyboardInterrupt: the loop stops where it is without saving the current step, but it does not
    end at once: the loop's cleanup (``CheckpointManager.close``) still waits for saves already
    started, so none is left half-written, before the KeyboardInterrupt ends the run."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def seconds_since(self) -> float | None:
        """Seconds from the signal to now (None without one): how long the stop took."""
        return None if self.received_at is None else time.perf_counter() - self.received_at

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (started saves are still waited for)
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.perf_counter()
            # os.write, not print: the handler may run in the middle of a print to the same stream.
            again = " (Ctrl-C again to stop at once without saving it)" if signum == signal.SIGINT else ""
            os.write(2, f"\n{self.signal_name}: stopping after this step and saving it{again}\n".encode())

    def install(self) -> "StopRequest":
        """Installs the handlers (main thread of a single-process run only: with several processes
        JAX's preemption sync, read through the checkpoint manager, decides the stop step)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
