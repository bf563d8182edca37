"""Stop requests: SIGTERM and Ctrl-C end a single-process run at the next step boundary, saved."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable


class StopRequest:
    """SIGTERM / SIGINT set a flag that the train loop checks between steps (the handler never saves:
    the loop saves the current step, waits for it, and exits 0). A second SIGINT calls
    ``on_second_interrupt`` (it says so in one line and ends the process at once, abandoning a save
    in flight, whose tmp folder the next resume removes); without one, it raises KeyboardInterrupt.
    Ending the process from the handler, rather than raising into whatever the loop or its cleanup
    is doing (a thread join, a lock held by a library), is what makes the second Ctrl-C certain to
    end the run."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_second_interrupt: Callable[[], None] | None = None):
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self.on_second_interrupt = on_second_interrupt
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def seconds_since(self) -> float | None:
        """Seconds from the signal to now (None without one): how long the stop took."""
        return None if self.received_at is None else time.perf_counter() - self.received_at

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            if self.on_second_interrupt is None:
                raise KeyboardInterrupt
            self.on_second_interrupt()
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
