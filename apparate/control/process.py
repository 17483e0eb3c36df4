"""``ControllerProcess``: a ``Controller`` in a process of its own, beside serving.

A controller thread would hold CPython's interpreter lock for every snapshot, check and tune,
and the serving thread would wait for it between the model's operators; in a process the
controller shares nothing with serving but the feedback window (shared memory the serving side
writes without waiting) and a pipe of configurations that the serving side polls between
batches.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import weakref

from apparate.control.controller import ConfigChange, Controller, ControllerConfig
from apparate.control.feedback import FeedbackWindow

log = logging.getLogger("apparate")


def _controller_main(config: ControllerConfig, window_name: str, changes, stop) -> None:
    """The controller process: send the first configuration, then step when due and send
    each change."""
    window = FeedbackWindow(config.num_sites, config.window, name=window_name)
    controller = Controller(config, window)
    changes.send(controller.start())
    parent = multiprocessing.parent_process()  # gone (killed) without setting stop: exit too
    try:
        while not stop.is_set() and parent.is_alive():
            try:
                if not controller.due():
                    time.sleep(0.002)
                    continue
                change = controller.step()
                if change is not None:
                    changes.send(change)
            except Exception:  # the controller must never stop serving
                log.exception("apparate: controller step failed; keeping the configuration")
    finally:
        window.close()


class ControllerProcess:
    """A ``Controller`` on ``window`` in its own process (see the module doc). The constructor
    returns once the process has sent its first configuration (``first``; spawn imports the
    caller's main module in the process first: seconds if that imports torch); ``changes``
    returns the configurations staged since the last call,
    never waiting. If the process dies, serving goes on with the last configuration (logged
    once)."""

    def __init__(self, config: ControllerConfig, window: FeedbackWindow,
                 start_timeout_s: float = 120.0):
        # spawn, not fork: the serving process has torch's and the serving loop's threads.
        context = multiprocessing.get_context("spawn")
        self._changes, sender = context.Pipe(duplex=False)
        self._stop = context.Event()
        self.process = context.Process(
            target=_controller_main, name="apparate-controller", daemon=True,
            args=(config, window.name, sender, self._stop))
        self.process.start()
        sender.close()
        self._lost = False
        # A runtime dropped without close() still stops its process.
        self._finalizer = weakref.finalize(self, _end_process, self._stop, self.process)
        deadline = time.monotonic() + start_timeout_s
        first = None
        while first is None and self.process.is_alive() and time.monotonic() < deadline:
            try:
                if self._changes.poll(0.05):
                    first = self._changes.recv()
            except EOFError:  # the process exited before it was ready
                break
        if first is None:
            self._finalizer()
            raise RuntimeError(
                "apparate: the controller process did not start (exit code "
                f"{self.process.exitcode}); see its error above. A script that builds a "
                'Runtime guards its entry point with `if __name__ == "__main__":`')
        self.first: ConfigChange = first

    def changes(self) -> list[ConfigChange]:
        found = []
        try:
            while not self._lost and self._changes.poll():
                found.append(self._changes.recv())
        except (EOFError, OSError):
            self._lost = True
            log.error("apparate: the controller process stopped (exit code %s); serving goes "
                      "on with the last configuration", self.process.exitcode)
        return found

    def close(self) -> list[ConfigChange]:
        """Stop the process; the configurations it staged that ``changes`` has not returned."""
        self._finalizer.detach()
        _end_process(self._stop, self.process)
        left = []
        try:
            while self._changes.poll():
                left.append(self._changes.recv())
        except (EOFError, OSError):
            pass  # the process has exited: everything it sent has been read
        self._changes.close()
        return left


def _end_process(stop, process) -> None:
    stop.set()
    process.join(timeout=5)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)
