"""Stopping a run cleanly on SIGINT (Ctrl-C), SIGTERM (a scheduler, `kill`) or SIGUSR1.

SIGUSR1 is the one to send under mpirun: Open MPI's mpirun passes it on to every rank and lets
them finish, while a SIGTERM sent to mpirun kills its ranks within a second, before any can save.
Slurm sends it to every task ahead of a job's time limit when asked (`sbatch --signal=USR1@120`).

The first signal while the training loop runs only asks it to stop: the loop finishes its step,
saves a checkpoint and ends. A second signal, or one while nothing can be saved yet (the data is
being prepared), stops at once by raising StopNow wherever the program is; every file npllama
writes is written atomically, so stopping at any instant leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import signal
import threading

# where a platform has no SIGUSR1 (Windows), the other two
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopRequests:
    """SIGINT, SIGTERM and SIGUSR1 while a run trains: the first asks the loop to stop after its step
    (and checkpoint); a second, or one that comes before the loop has begun, stops at once."""

    def __init__(self):
        self.signal_number = None  # the signal the run stops under: the first received, or the ranks' choice
        self.received = 0  # the signals this process itself has received
        self.deferring = False  # True while the training loop can stop cleanly at its next step
        self.stopped = False  # True once the run is stopping: later signals have nothing left to stop

    def __call__(self, signal_number, frame):
        if self.stopped:
            return
        self.received += 1
        if self.deferring and self.received == 1:
            self.signal_number = self.signal_number or signal_number
            return
        self.signal_number = self.signal_number or signal_number
        self.stopped = True
        raise StopNow(signal_number)

    def stop_after_step(self, signal_number):
        """Under mpirun: the ranks have agreed to stop after this step, under this signal (another
        rank's, perhaps). This process's own signal, arriving later, is still its first: a request."""
        self.signal_number = signal_number


class StopNow(BaseException):
    """Raised inside whatever runs when a signal must stop the run at once (never caught as an Exception)."""

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number


def signals_end_the_process() -> None:
    """From now on SIGINT, SIGTERM and SIGUSR1 end the process at once, by the signal itself (a
    shell reports 128 + its number): for a run that has stopped and is exiting, so that a second
    signal arriving while Python shuts down ends it quietly, not with a KeyboardInterrupt traceback
    from an exit handler."""
    if threading.current_thread() is threading.main_thread():
        for number in SIGNALS:
            signal.signal(number, signal.SIG_DFL)


@contextlib.contextmanager
def stop_requests():
    """Route SIGINT, SIGTERM and SIGUSR1 to a StopRequests for the block (where signals can be
    handled: the main thread), and restore the previous handlers after it."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {number: signal.signal(number, requests) for number in SIGNALS}
    try:
        yield requests
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
