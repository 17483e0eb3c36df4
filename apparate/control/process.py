"""``ControllerProcess``: a ``Controller`` in a process of its own, beside serving.

A controller thread would hold CPython's interpreter lock for every snapshot, check and tune,
and the serving thread would wait for it between the model's operators; in a process the
controller shares nothing with serving but the feedback window (shared memory the serving side
writes without waiting), a pipe of configurations that the serving side polls between batches,
and two lock-free shared values: a stop flag and the process's heartbeat.

The process is started with multiprocessing's spawn, which runs the caller's main module again
in the new process before the controller (under the name ``__mp_main__``). ``check_spawnable``
refuses, before anything is started, the two launches where that cannot work: a script read
from standard input (no file to run again) and a call at the top level of a script, outside
``if __name__ == "__main__":`` (the new process would build its own runtime, ramp training
included, before failing).

Nothing the serving side does here waits on the process for long: ``changes`` and ``health``
never wait, and ``close`` and ``restart`` end even a stopped or wedged process within
``STOP_WAIT_S + KILL_WAIT_S``.
"""

from __future__ import annotations

import ast
import logging
import multiprocessing
import os
import sys
import threading
import time
import tokenize
from multiprocessing import process as mp_process
from multiprocessing import util as mp_util

from apparate.control.controller import ConfigChange, Controller, ControllerConfig
from apparate.control.feedback import FeedbackWindow

log = logging.getLogger("apparate")

# How long ``close`` waits for the process to stop by itself before it kills it, then for the
# kill. SIGKILL, not terminate's SIGTERM: a stopped process leaves SIGTERM pending.
STOP_WAIT_S = 0.5
KILL_WAIT_S = 1.0


def check_spawnable() -> None:
    """Raise ``RuntimeError`` where spawn cannot start the controller process from this
    caller: the main module is a script read from standard input (``python - <<EOF``), or this
    call runs at the top level of the main script, outside ``if __name__ == "__main__":``.

    Passes where spawn runs nothing of the main module again (an interactive session, a
    notebook, ``python -c``, a package's ``__main__``), where the call is under the guard
    (directly or from functions called there), and where the caller's line cannot be found or
    the script cannot be read (nothing to judge by)."""
    main = sys.modules.get("__main__")
    if main is None:
        return
    # What spawn's get_preparation_data sends the new process to run again.
    name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    if name is not None:
        if name == "__main__" or name.endswith(".__main__"):
            return  # spawn never runs a package's __main__ again
    elif path is None:
        return  # REPL, notebook, python -c: nothing to run again
    else:
        if not os.path.isabs(path) and mp_process.ORIGINAL_DIR is not None:
            path = os.path.join(mp_process.ORIGINAL_DIR, path)
        if not os.path.isfile(path):
            raise RuntimeError(
                "apparate: the controller process cannot start from the main script "
                f"{getattr(main, '__file__')!r}, which is not a file (a script read from "
                "standard input?): multiprocessing's spawn runs the main script again in the "
                "new process and needs its file. Run the script from a file (python "
                "script.py) or in an interactive session or notebook, or pass "
                "background=False to the Runtime to run the controller in the serving thread.")
    if path is None:
        return
    line = _main_module_line(main, path)
    if line is None:
        return
    guarded = _guarded_spans(path)
    if guarded is None or any(first <= line <= last for first, last in guarded):
        return
    raise RuntimeError(
        f'apparate: the controller process was started at line {line} of {path}, outside '
        '`if __name__ == "__main__":`. multiprocessing\'s spawn runs that script again in the '
        "new process, which would run this line again (and everything before it) before "
        "failing. Guard the script's entry point:\n\n"
        '    if __name__ == "__main__":\n'
        "        main()\n\n"
        "or pass background=False to the Runtime to run the controller in the serving thread.")


def _main_module_line(main, path: str) -> int | None:
    """The line the main module's top-level code is executing (in this thread's stack, or in
    the main thread's when this one was started elsewhere), or None where it is on neither."""
    target = os.path.normcase(os.path.abspath(path))
    stacks = [sys._getframe(1)]
    if threading.current_thread() is not threading.main_thread():
        stacks.append(sys._current_frames().get(threading.main_thread().ident))
    for frame in stacks:
        while frame is not None:
            code = frame.f_code
            if (frame.f_globals is main.__dict__ and code.co_name == "<module>"
                    and os.path.normcase(os.path.abspath(code.co_filename)) == target):
                return frame.f_lineno
            frame = frame.f_back
    return None


def _guarded_spans(path: str) -> list[tuple[int, int]] | None:
    """The (first, last) lines of each block of ``path`` that runs only as the main module:
    the body of ``if __name__ == "__main__":`` (either order), the ``else`` of ``!=``. None
    where the file cannot be read or parsed."""
    try:
        with tokenize.open(path) as file:
            tree = ast.parse(file.read(), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            block = _main_only_block(node)
            if block:
                spans.append((block[0].lineno, block[-1].end_lineno or block[-1].lineno))
    return spans


def _main_only_block(node: ast.If) -> list[ast.stmt]:
    test = node.test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return []

    def side(expr: ast.expr) -> str:
        if isinstance(expr, ast.Name) and expr.id == "__name__":
            return "name"
        if isinstance(expr, ast.Constant) and expr.value == "__main__":
            return "main"
        return ""

    if {side(test.left), side(test.comparators[0])} != {"name", "main"}:
        return []
    if isinstance(test.ops[0], ast.Eq):
        return node.body
    if isinstance(test.ops[0], ast.NotEq):
        return node.orelse
    return []


def _controller_main(config: ControllerConfig, window_name: str, changes, stop, beat) -> None:
    """The controller process: send the first configuration, then step when due and send
    each change, stamping ``beat`` (time.monotonic, one clock for every process) at every turn
    of the loop."""
    window = FeedbackWindow(config.num_sites, config.window, name=window_name)
    controller = Controller(config, window)
    beat.value = time.monotonic()
    changes.send(controller.start())
    parent = multiprocessing.parent_process()  # gone (killed) without setting stop: exit too
    try:
        while not stop.value and parent.is_alive():
            beat.value = time.monotonic()
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
    """A ``Controller`` on ``window`` in its own process (see the module doc).

    The constructor first calls ``check_spawnable``, then returns once the process has sent
    its first configuration (``first``; spawn imports the caller's main module in the process
    first: seconds if that imports torch), or raises ``RuntimeError`` if it exits or does not
    send it within ``start_timeout_s``. ``changes`` returns the configurations staged since the
    last call, never waiting. If the process dies, serving goes on with the last configuration
    (logged once); ``health`` tells a dead or wedged process (its loop silent for ``stall_s``)
    from a running one, and ``restart`` replaces it."""

    def __init__(self, config: ControllerConfig, window: FeedbackWindow,
                 start_timeout_s: float = 120.0, stall_s: float = 2.0):
        check_spawnable()
        if not stall_s > 0:
            raise ValueError(f"stall_s: expected > 0 seconds, got {stall_s}")
        self.config = config
        self.window = window
        self.start_timeout_s = start_timeout_s
        self.stall_s = stall_s
        self.first: ConfigChange = self._start()

    def _start(self) -> ConfigChange:
        # spawn, not fork: the serving process has torch's and the serving loop's threads.
        context = multiprocessing.get_context("spawn")
        self._changes, sender = context.Pipe(duplex=False)
        # Raw (lock-free) values: a process killed or stopped while holding a lock would leave
        # the serving side waiting on it for ever.
        self._stop = context.RawValue("b", 0)
        self._beat = context.RawValue("d", 0.0)
        self.process = context.Process(
            target=_controller_main, name="apparate-controller", daemon=True,
            args=(self.config, self.window.name, sender, self._stop, self._beat))
        self.process.start()
        sender.close()
        self._lost = False
        # Also when the owner is dropped without close(); at exit, before multiprocessing's
        # own exit handler, which terminates (SIGTERM) and joins daemonic children without a
        # timeout and so never returns over a stopped one.
        self._finalizer = mp_util.Finalize(self, _end_process, args=(self._stop, self.process),
                                           exitpriority=10)
        deadline = time.monotonic() + self.start_timeout_s
        first = None
        while first is None and self.process.is_alive() and time.monotonic() < deadline:
            try:
                if self._changes.poll(0.05):
                    first = self._changes.recv()
            except EOFError:  # the process exited before it was ready
                break
        if first is None:
            timed_out = self.process.is_alive()
            self._finalizer()
            self._changes.close()
            self._lost = True
            if timed_out:
                raise RuntimeError(
                    f"apparate: the controller process did not send its first configuration "
                    f"within start_timeout_s={self.start_timeout_s} s and was stopped")
            raise RuntimeError(
                f"apparate: the controller process did not start (exit code "
                f"{self.process.exitcode}); see the error it printed above")
        return first

    def changes(self) -> list[ConfigChange]:
        """The configurations staged since the last call, oldest first; [] once the process
        has died (logged once) or been closed. Never waits, never raises."""
        found = []
        try:
            while not self._lost and self._changes.poll():
                found.append(self._changes.recv())
        except (EOFError, OSError):
            self._lost = True
            log.error("apparate: the controller process stopped (exit code %s); serving goes "
                      "on with the last configuration", self.process.exitcode)
        return found

    def health(self) -> str:
        """The process's state, without waiting:

        - ``"running"``: alive, and its loop turned within the last ``stall_s`` (it stamps a
          heartbeat at every turn, idle or stepping).
        - ``"wedged"``: alive, but its loop has not turned for ``stall_s``: stopped (SIGSTOP),
          stuck in a step, or starved of CPU. Its changes may still come; ``restart`` replaces
          it.
        - ``"dead"``: it has exited (killed, crashed) or its pipe is gone, or it was closed.
          Serving goes on with the last configuration; ``restart`` starts a new one.
        """
        if self._lost or not self.process.is_alive():
            return "dead"
        if time.monotonic() - self._beat.value > self.stall_s:
            return "wedged"
        return "running"

    def restart(self) -> ConfigChange:
        """Stop the process as ``close`` does (within ``STOP_WAIT_S + KILL_WAIT_S``, whatever
        its state) and start a new controller on the same window and config; return its first
        configuration (also ``first``). Configurations the old process staged that ``changes``
        has not returned are dropped. The new controller starts from its first configuration,
        not the last one served: whether to serve it is the caller's choice. Raises
        ``RuntimeError`` as the constructor does if the new process does not start."""
        self._end()
        self.first = self._start()
        return self.first

    def close(self) -> list[ConfigChange]:
        """Stop the process, within ``STOP_WAIT_S + KILL_WAIT_S`` whatever its state (a stopped
        or wedged process is killed); the configurations it staged that ``changes`` has not
        returned."""
        return self._end()

    def _end(self) -> list[ConfigChange]:
        self._finalizer()
        left = []
        # A process that outlived its kill (uninterruptible) may hold half a message: a recv
        # would wait for the rest.
        if not self._lost and not self.process.is_alive():
            try:
                while self._changes.poll():
                    left.append(self._changes.recv())
            except (EOFError, OSError):
                pass  # the process has exited: everything it sent has been read
        self._changes.close()
        self._lost = True
        return left


def _end_process(stop, process) -> None:
    stop.value = 1
    process.join(timeout=STOP_WAIT_S)
    if process.is_alive():
        process.kill()
        process.join(timeout=KILL_WAIT_S)
