"""The build lock of q2kernels._C (q2kernels/_ext.py build_lock) under the ways a build ends badly.

A build killed mid-way used to leave torch's lock file (<build dir>/lock) behind, and every later
integer op waited on it forever, printing nothing. Now: the lock records its owner; a waiter says
within seconds which file it waits on and who holds it; the lock of an owner that no longer runs on
this host (and torch's lock it left) is taken over; a lock that records no owner is waited on for a
bounded time, then reported as an error naming the file to delete. No test builds anything: the
locks are faked in a temporary build directory, and _ext.load runs with torch's builder stubbed.
torch 2.14's builder locks its file with an OS lock instead, whose file stays after every build and
blocks nothing: there q2kernels ignores it (the last test); the others fake the older, presence-based
builder, whatever the installed torch.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from torch.utils import cpp_extension

from q2kernels import _ext

# Waits in these tests are reported after this long, and polled this often.
REPORT_AFTER_S = 0.2
POLL_S = 0.02
# The longest any test waits for something that should happen within a second.
PATIENCE_S = 20.0


@pytest.fixture(autouse=True)
def presence_lock(monkeypatch):
    """torch's builder as up to 2.13: its lock file's presence blocks (FileBaton)."""
    monkeypatch.setattr(_ext, "torch_lock_is_presence", lambda: True)


def _record(pid, host=None, start=None, since=None):
    return json.dumps({"pid": pid, "host": socket.gethostname() if host is None else host, "start": start,
                       "since": time.time() if since is None else since})


def _dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _lock(tmp_path, report, **kw):
    return _ext.build_lock(tmp_path, report=report, poll_s=POLL_S, report_after_s=REPORT_AFTER_S, **kw)


class Waiter(threading.Thread):
    """Takes the build lock of build_dir in a thread, recording what it reports, so that a test can
    watch a wait and end it."""

    def __init__(self, build_dir, **kw):
        super().__init__(daemon=True)
        self.build_dir, self.kw = build_dir, kw
        self.messages, self.acquired, self.error = [], threading.Event(), None

    def run(self):
        try:
            with _lock(self.build_dir, self.messages.append, **self.kw):
                self.acquired.set()
        except Exception as e:  # noqa: BLE001  (handed to the test)
            self.error = e

    def message_within(self, seconds):
        deadline = time.monotonic() + seconds
        while not self.messages and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return self.messages[0] if self.messages else None


def test_the_lock_records_its_owner_and_is_released(tmp_path):
    lock = tmp_path / _ext.BUILD_LOCK
    with _lock(tmp_path, pytest.fail):
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert _ext.is_running(_ext._decode(lock.read_text()))
    assert not lock.exists()


def test_the_lock_is_released_when_the_body_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with _lock(tmp_path, pytest.fail):
            raise KeyboardInterrupt
    assert not (tmp_path / _ext.BUILD_LOCK).exists()


@pytest.mark.parametrize("owner", ["exited", "reused_pid"])
def test_a_dead_owners_locks_are_taken_over(tmp_path, owner):
    """A build killed mid-build leaves q2kernels' lock and torch's: both go, and the load goes on.
    A pid now held by another process (a different start time) is no owner either."""
    pid, start = (_dead_pid(), None) if owner == "exited" else (os.getpid(), -1)
    (tmp_path / _ext.BUILD_LOCK).write_text(_record(pid, start=start))
    (tmp_path / _ext.TORCH_LOCK).write_text("")
    messages = []
    started = time.monotonic()
    with _lock(tmp_path, messages.append):
        assert json.loads((tmp_path / _ext.BUILD_LOCK).read_text())["pid"] == os.getpid()
        assert not (tmp_path / _ext.TORCH_LOCK).exists()
    assert time.monotonic() - started < PATIENCE_S
    assert len(messages) == 1 and f"pid {pid}" in messages[0] and "no longer runs" in messages[0]
    assert str(tmp_path / _ext.BUILD_LOCK) in messages[0]


@pytest.mark.parametrize("host", ["this", "other"])
def test_a_wait_on_an_owner_that_may_run_is_reported_within_seconds(tmp_path, host):
    """A running owner (or one on another host, which cannot be checked) is waited on, and the wait
    says which file, which process, and what to do; the wait ends when the lock is released."""
    lock = tmp_path / _ext.BUILD_LOCK
    pid = os.getpid() if host == "this" else _dead_pid()
    hostname = socket.gethostname() if host == "this" else "another-host.invalid"
    lock.write_text(_record(pid, host=hostname, start=_ext.this_process().start))
    waiter = Waiter(tmp_path)
    waiter.start()
    message = waiter.message_within(PATIENCE_S)
    assert message is not None, "the wait was not reported"
    assert str(lock) in message and f"pid {pid} on {hostname}" in message and f"delete {lock}" in message
    assert not waiter.acquired.is_set() and lock.exists()
    lock.unlink()
    waiter.join(PATIENCE_S)
    assert waiter.acquired.is_set() and waiter.error is None


def test_a_young_torch_lock_without_owner_is_waited_on_and_reported(tmp_path):
    torch_lock = tmp_path / _ext.TORCH_LOCK
    torch_lock.write_text("")
    waiter = Waiter(tmp_path)
    waiter.start()
    message = waiter.message_within(PATIENCE_S)
    assert message is not None and str(torch_lock) in message and "records no owner" in message
    assert f"delete {torch_lock}" in message
    torch_lock.unlink()
    waiter.join(PATIENCE_S)
    assert waiter.acquired.is_set() and waiter.error is None
    assert not (tmp_path / _ext.BUILD_LOCK).exists()


def test_an_old_torch_lock_without_owner_is_an_error_naming_it(tmp_path):
    """torch's lock alone (left by a build before q2kernels recorded owners, or outside q2kernels):
    nobody can tell whether it is live, so past the bound it is an error that says what to do."""
    torch_lock = tmp_path / _ext.TORCH_LOCK
    torch_lock.write_text("")
    old = time.time() - 120
    os.utime(torch_lock, (old, old))
    with pytest.raises(RuntimeError, match=f"the build lock {torch_lock} records no owner .* delete {torch_lock}"):
        with _lock(tmp_path, lambda m: None, unowned_limit_s=60):
            pytest.fail("the body ran under a stale lock")
    assert torch_lock.exists(), "a lock that records no owner is never removed"
    assert not (tmp_path / _ext.BUILD_LOCK).exists(), "q2kernels' own lock was not released"


GARBLED = ["", "{", "not json", "[1, 2]", "1e999", "[" * 100000,
           _record(0), _record(-1), _record(2**40), _record(True), _record("12"),
           json.dumps({"pid": 1, "host": 5, "start": None, "since": 0.0}),
           json.dumps({"pid": 1, "host": "h", "start": "x", "since": 0.0}),
           json.dumps({"pid": 1, "host": "h", "start": None, "since": "yesterday"}),
           json.dumps({"pid": 1})]


@pytest.mark.parametrize("text", GARBLED, ids=range(len(GARBLED)))
def test_a_garbled_record_counts_as_no_owner(tmp_path, text):
    """Never a crash, never a signal to pid 0 or -1 (the process group, every process): a record that
    is not an owner is a lock without owner, an error once older than the bound."""
    lock = tmp_path / _ext.BUILD_LOCK
    lock.write_text(text)
    old = time.time() - 120
    os.utime(lock, (old, old))
    with pytest.raises(RuntimeError, match=f"the build lock {lock} records no owner"):
        with _lock(tmp_path, lambda m: None, unowned_limit_s=60):
            pytest.fail("the body ran under a lock it does not hold")
    assert lock.read_text() == text


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from q2kernels import _ext
    build_dir = Path(sys.argv[1])
    with _ext.build_lock(build_dir):
        (build_dir / _ext.TORCH_LOCK).write_text("")  # what torch's builder takes inside
        print("building", flush=True)
        time.sleep(120)
""")


def test_a_build_killed_midway_is_reported_then_taken_over(tmp_path):
    """The way the hang was found: a process holding the locks is killed (SIGKILL: no cleanup runs).
    A second process waiting on it says so within seconds; once it is gone, the locks are taken over."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "building"
        waiter = Waiter(tmp_path)
        waiter.start()
        message = waiter.message_within(PATIENCE_S)
        assert message is not None and f"pid {child.pid}" in message
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    waiter.join(PATIENCE_S)
    assert waiter.acquired.is_set() and waiter.error is None
    assert any("no longer runs" in m and f"pid {child.pid}" in m for m in waiter.messages)
    assert not (tmp_path / _ext.TORCH_LOCK).exists() and not (tmp_path / _ext.BUILD_LOCK).exists()


def test_load_builds_under_the_lock_after_taking_over_a_stale_one(tmp_path, monkeypatch):
    """_ext.load itself: with a stale lock pair in its build directory, torch's builder is called
    (stubbed here) with the locks taken over, in the directory the lock guards."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("Q2K_BUILD_CUDA", "0")
    monkeypatch.delenv("Q2K_SANITIZE", raising=False)
    build_dir = tmp_path / "q2kernels_C" / _ext.torch_build_tag()
    build_dir.mkdir(parents=True)
    (build_dir / _ext.BUILD_LOCK).write_text(_record(_dead_pid()))
    (build_dir / _ext.TORCH_LOCK).write_text("")
    seen = {}

    def fake_load(**kwargs):
        seen["build_directory"] = kwargs["build_directory"]
        seen["owner"] = json.loads((build_dir / _ext.BUILD_LOCK).read_text())["pid"]
        seen["torch_lock"] = (build_dir / _ext.TORCH_LOCK).exists()
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert _ext.load.__wrapped__() == "module"
    assert seen == {"build_directory": str(build_dir), "owner": os.getpid(), "torch_lock": False}
    assert not (build_dir / _ext.BUILD_LOCK).exists()


@pytest.mark.parametrize("age_s", [0.0, 10 * _ext.UNOWNED_LOCK_LIMIT_S])
def test_an_os_locked_torch_lock_file_is_ignored(tmp_path, monkeypatch, age_s):
    """torch 2.14 (FileLock): the lock file stays after every build and locks nothing by its presence.
    A load with that file present neither waits, nor errs, nor removes torch's file."""
    monkeypatch.setattr(_ext, "torch_lock_is_presence", lambda: False)
    torch_lock = tmp_path / _ext.TORCH_LOCK
    torch_lock.write_text("")
    old = time.time() - age_s
    os.utime(torch_lock, (old, old))
    messages = []
    started = time.monotonic()
    with _lock(tmp_path, messages.append):
        pass
    assert time.monotonic() - started < 1.0 and messages == [] and torch_lock.exists()


def test_the_installed_torch_is_classified():
    """The installed torch's builder is one of the two kinds the lock logic knows."""
    has_baton, has_filelock = hasattr(cpp_extension, "FileBaton"), hasattr(cpp_extension, "FileLock")
    assert has_baton != has_filelock, "torch's builder changed its lock again: review q2kernels/_ext.py"
