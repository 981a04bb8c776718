"""Ctrl-C during training: the run stops after a whole, counted iteration, so that the last.pt it
then writes resumes exactly, on one process or every process of a torchrun job alike."""
import signal
import threading


class StopRequest:
    """The first Ctrl-C (SIGINT) only asks the loop to stop after the iteration it is in, so the
    checkpoint it then writes never holds a step whose iteration was not counted; a second
    Ctrl-C interrupts at once, except while a step is applied and counted (applying). Under
    torchrun a second SIGINT is torchrun forwarding the same Ctrl-C to its workers: it changes
    nothing, so every process still stops after the same step (torchrun kills what lingers)."""

    def __init__(self, ddp=False):
        self.requested, self.ddp, self.applying = False, ddp, False
        self.previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.handle)
        else:  # signal handlers live in the main thread only
            self.previous = None

    def handle(self, signum, frame):
        if self.requested and not self.ddp and not self.applying:
            raise KeyboardInterrupt
        self.requested = True  # while applying: the loop stops as soon as the step is counted

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
