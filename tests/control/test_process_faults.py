"""The controller process failing well: launches spawn cannot serve are refused before anything
starts, a killed or stopped process is told apart from a running one, ended without waiting,
and replaced."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apparate.control.feedback import FeedbackWindow
from apparate.control.process import ControllerProcess, _guarded_spans
from tests.control.test_controller import agreeing_rows, lenient_config

REPO = Path(__file__).resolve().parents[2]

posix_signals = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def stop(pid: int) -> None:
    """SIGSTOP ``pid`` and return once it is stopped: until then a SIGTERM still ends it."""
    os.kill(pid, signal.SIGSTOP)
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        time.sleep(0.5)
        return
    # The state follows the command name, which is in parentheses.
    assert wait_for(lambda: stat.read_text().rpartition(")")[2].split()[0] == "T", 5)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def window():
    config = lenient_config()
    window = FeedbackWindow(config.num_sites, config.window)
    yield window
    window.close()


def test_a_killed_process_reads_dead_and_changes_go_on_returning_nothing(window):
    controller = ControllerProcess(lenient_config(), window)
    try:
        assert controller.health() == "running"
        controller.process.kill()
        assert wait_for(lambda: controller.health() == "dead", 5)
        assert controller.changes() == [] and controller.changes() == []
        assert controller.health() == "dead"
    finally:
        left = controller.close()
    assert left == []


@posix_signals
def test_a_stopped_process_reads_wedged_after_stall_s_and_close_kills_it_at_once(window):
    stall_s = 1.0
    controller = ControllerProcess(lenient_config(), window, stall_s=stall_s)
    pid = controller.process.pid
    try:
        stop(pid)
        stopped = time.monotonic()
        # Its last heartbeat is fresh: not wedged until stall_s has passed.
        assert controller.health() == "running"
        assert wait_for(lambda: controller.health() == "wedged", stall_s + 5)
        assert time.monotonic() - stopped > stall_s * 0.5
        assert controller.changes() == []  # never waits on the stopped process
        started = time.monotonic()
        controller.close()
        took = time.monotonic() - started
    finally:
        controller.close()
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    assert took < 2.0, f"close() took {took:.2f} s over a stopped process"
    assert gone(pid)
    assert controller.process.exitcode == -signal.SIGKILL
    assert controller.health() == "dead"


def test_restart_after_a_kill_gives_a_process_that_sends_changes(window):
    controller = ControllerProcess(lenient_config(), window)
    try:
        old = controller.process.pid
        controller.process.kill()
        assert wait_for(lambda: controller.health() == "dead", 5)
        first = controller.restart()
        assert first.reason == "start" and controller.first is first
        assert controller.process.pid != old and gone(old)
        assert controller.health() == "running"
        window.record(*agreeing_rows(48))
        found = []
        deadline = time.monotonic() + 60
        while not found and time.monotonic() < deadline:
            time.sleep(0.01)
            found += controller.changes()
        assert found, "the restarted process staged a configuration from the window's rows"
        assert found[0].thresholds.shape == (window.num_sites,)
    finally:
        controller.close()
    assert gone(controller.process.pid)


@posix_signals
def test_restart_replaces_a_stopped_process(window):
    controller = ControllerProcess(lenient_config(), window)
    old = controller.process.pid
    try:
        stop(old)
        controller.restart()
        assert gone(old)
        assert controller.health() == "running"
    finally:
        controller.close()
        if not gone(old):
            os.kill(old, signal.SIGKILL)


@posix_signals
def test_a_dropped_controller_kills_its_stopped_process(window):
    controller = ControllerProcess(lenient_config(), window)
    pid = controller.process.pid
    stop(pid)
    del controller
    gc.collect()
    try:
        assert gone(pid)
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_main_only_blocks_are_found_in_either_order_and_under_not_equal(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"                      # 1
        "if __name__ == '__main__':\n"      # 2
        "    a = 1\n"                       # 3
        "    b = (1,\n"                     # 4
        "         2)\n"                     # 5
        "if '__main__' == __name__:\n"      # 6
        "    c = 3\n"                       # 7
        "if __name__ != '__main__':\n"      # 8
        "    d = 4\n"                       # 9
        "else:\n"                           # 10
        "    e = 5\n"                       # 11
        "if __name__ == 'other':\n"         # 12
        "    f = 6\n")                      # 13
    assert sorted(_guarded_spans(str(script))) == [(3, 5), (7, 7), (11, 11)]


# Launches, each in a real interpreter: a function builds the controller; the script calls it
# under the guard, at its top level, or from a thread started there.
SERVE = """
import os, signal, sys
from apparate.control.feedback import FeedbackWindow
from apparate.control.process import ControllerProcess
from tests.control.test_controller import lenient_config
from tests.control.test_process_faults import stop
print("top level ran", flush=True)

def serve(stop_it=False):
    config = lenient_config()
    window = FeedbackWindow(config.num_sites, config.window)
    controller = ControllerProcess(config, window, start_timeout_s=30)
    print("served", controller.first.reason, controller.health(), flush=True)
    if stop_it:
        with open("controller.pid", "w") as file:
            file.write(str(controller.process.pid))
        stop(controller.process.pid)
        return controller  # left to the exit handlers, stopped
    controller.close()
    window.close()
"""
GUARDED = SERVE + 'if __name__ == "__main__":\n    serve()\n'
REVERSED_GUARD = SERVE + 'if "__main__" == __name__:\n    serve()\n'
UNGUARDED = SERVE + "serve()\n"
THREAD_UNGUARDED = SERVE + ("import threading\n"
                            "thread = threading.Thread(target=serve)\n"
                            "thread.start()\n"
                            "thread.join()\n")
# A finalizer made before multiprocessing is imported puts weakref's exit handler behind
# multiprocessing's, which joins its children without a timeout.
STOPPED_AT_EXIT = ("import weakref\nweakref.finalize(print, print)\n" + SERVE
                   + 'if __name__ == "__main__":\n    kept = serve(stop_it=True)\n')

NEEDS_FILE = "cannot start from the main script '<stdin>', which is not a file"
NEEDS_GUARD = 'outside `if __name__ == "__main__":`'


def launch(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=30)


def test_a_script_from_standard_input_is_refused_before_anything_starts(tmp_path):
    done = launch(["-"], tmp_path, stdin=GUARDED)
    assert done.returncode != 0
    assert NEEDS_FILE in done.stderr and "background=False" in done.stderr, done.stderr
    assert "FileNotFoundError" not in done.stderr and "served" not in done.stdout


def test_python_c_has_no_main_file_to_run_again_and_works(tmp_path):
    done = launch(["-c", GUARDED], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "served start running" in done.stdout


@pytest.mark.parametrize("source", [GUARDED, REVERSED_GUARD], ids=["guard", "reversed-guard"])
def test_a_guarded_script_file_works(tmp_path, source):
    (tmp_path / "serve_script.py").write_text(source)
    done = launch(["serve_script.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "served start running" in done.stdout


def test_a_guarded_module_run_with_dash_m_works(tmp_path):
    (tmp_path / "serve_module.py").write_text(GUARDED)
    done = launch(["-m", "serve_module"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "served start running" in done.stdout


@pytest.mark.parametrize("args", [["serve_script.py"], ["-m", "serve_script"]],
                         ids=["file", "dash-m"])
def test_an_unguarded_script_is_refused_before_anything_starts(tmp_path, args):
    (tmp_path / "serve_script.py").write_text(UNGUARDED)
    done = launch(args, tmp_path)
    assert done.returncode != 0
    assert NEEDS_GUARD in done.stderr and "background=False" in done.stderr, done.stderr
    assert f"line {len(SERVE.splitlines()) + 1} of" in done.stderr  # the serve() call
    # No process started: nothing ran the script a second time.
    assert done.stdout.count("top level ran") == 1 and "served" not in done.stdout


def test_an_unguarded_script_starting_the_controller_from_a_thread_is_refused(tmp_path):
    (tmp_path / "serve_script.py").write_text(THREAD_UNGUARDED)
    done = launch(["serve_script.py"], tmp_path)
    assert NEEDS_GUARD in done.stderr, done.stderr
    assert done.stdout.count("top level ran") == 1 and "served" not in done.stdout


@posix_signals
def test_a_script_exits_over_a_stopped_controller_and_leaves_no_process(tmp_path):
    (tmp_path / "serve_script.py").write_text(STOPPED_AT_EXIT)
    try:
        done = launch(["serve_script.py"], tmp_path)  # multiprocessing alone waits for ever
        assert done.returncode == 0, done.stderr
        assert gone(int((tmp_path / "controller.pid").read_text()))
    finally:
        pid_file = tmp_path / "controller.pid"
        if pid_file.exists() and not gone(pid := int(pid_file.read_text())):
            os.kill(pid, signal.SIGKILL)
