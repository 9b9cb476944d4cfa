"""The run folder's RUNNING file: one live training per folder, and a dead holder's file taken over."""
import json
import signal
import subprocess
import sys
import time

import pytest

from megatron_dapo.trainer.lock import LOCK_FILE, RunFolderInUse, RunLock

HOLDER = """
import sys, time
from megatron_dapo.trainer.lock import RunLock
lock = RunLock(sys.argv[1], heartbeat_s=0.1, stale_s=2.0, host=sys.argv[2] or None)
if sys.argv[4:]:  # another machine of the same host name (another cluster on the same file system, a container)
    lock.owner["boot_id"] = sys.argv[4]
lock.acquire()
print("held", flush=True)
if sys.argv[3] == "exit":
    sys.exit(0)  # released at exit
if sys.argv[3] == "raise":
    raise RuntimeError("a crash")
while True:
    time.sleep(0.05)
    lock.check()
"""


def _holder(run_dir, host="", then="hold", boot_id=None):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), host, then, *([boot_id] if boot_id else [])],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_live_holder_on_this_host_is_refused_at_once_and_a_killed_one_taken_over(tmp_path):
    holder = _holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(RunFolderInUse, match=rf"trainer.run_dir={tmp_path} is in use .*pid {holder.pid}.*STOP"):
            RunLock(tmp_path, stale_s=30).acquire()
        assert time.monotonic() - start < 5  # no wait for a heartbeat: the pid tells
    finally:
        _kill(holder)
    assert (tmp_path / LOCK_FILE).exists()  # SIGKILL left it
    lock = RunLock(tmp_path, stale_s=30)
    start = time.monotonic()
    lock.acquire()
    assert time.monotonic() - start < 5
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.owner["token"]
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_holder_on_another_host_counts_as_alive_while_its_file_changes(tmp_path):
    holder = _holder(tmp_path, host="node-b")
    waits = []
    try:
        with pytest.raises(RunFolderInUse, match="host node-b.*changed within 2 s"):
            RunLock(tmp_path, stale_s=2.0).acquire(say=waits.append)
        assert len(waits) == 1 and "node-b" in waits[0]
    finally:
        _kill(holder)
    lock = RunLock(tmp_path, stale_s=1.0)
    start = time.monotonic()
    lock.acquire(say=waits.append)  # its file stops changing: after stale_s the folder is taken over
    assert 1.0 <= time.monotonic() - start < 10
    lock.release()


def test_a_holder_of_the_same_host_name_on_another_machine_is_judged_by_its_heartbeat(tmp_path):
    """Its pid means nothing here (another boot, or another pid namespace): no pid looked up, no take-over at once."""
    holder = _holder(tmp_path, boot_id="another-boot")
    try:
        with pytest.raises(RunFolderInUse, match="changed within 2 s"):
            RunLock(tmp_path, stale_s=2.0).acquire(say=lambda _: None)
    finally:
        _kill(holder)


def test_a_take_over_never_deletes_a_file_another_newcomer_has_just_made(tmp_path):
    """Two newcomers find the same dead holder's file: the first replaces it with its own; the second, which read
    the dead one's, must not delete the first's (a read then a delete could)."""
    path = tmp_path / LOCK_FILE
    dead = json.dumps({"host": "node-c", "pid": 7, "started": "then", "token": "dead"}).encode()
    path.write_bytes(dead)
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first._take_over(dead)
    assert not path.exists()
    assert first._create()
    made = path.read_bytes()
    second._take_over(dead)  # what the second newcomer does next, having seen the dead holder's file
    assert path.read_bytes() == made and sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    assert not second._create()


def test_a_clean_exit_and_a_python_error_release_the_folder(tmp_path):
    for then in ("exit", "raise"):
        holder = _holder(tmp_path, then=then)
        holder.wait(timeout=30)
        assert holder.returncode == (0 if then == "exit" else 1)
        assert not (tmp_path / LOCK_FILE).exists(), then


def test_a_holder_whose_folder_was_taken_over_stops(tmp_path):
    holder = _holder(tmp_path, host="node-b")
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-c", "pid": 7, "started": "then", "token": "x"}))
        holder.wait(timeout=30)  # its next beat sees another holder; check() raises
        assert holder.returncode == 1
        assert "was taken over by another training (host node-c, pid 7" in holder.stderr.read()
    finally:
        if holder.poll() is None:
            _kill(holder)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-c"  # the new holder's file is left alone


def test_an_unreadable_file_that_never_changes_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"host": "node-b", "pi')  # a holder died writing it
    lock = RunLock(tmp_path, stale_s=0.5)
    lock.acquire(say=lambda line: None)
    assert lock.held
    lock.release()


def test_a_torn_beat_is_rewritten_and_a_newcomer_s_half_written_file_waited_for(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.2, stale_s=2.0)
    lock.acquire(say=lambda line: None)
    try:
        path = tmp_path / LOCK_FILE
        path.write_text('{"host": "node-b", "pi')  # our own beat cut short by a file-system error
        deadline = time.monotonic() + 5
        while path.read_text().startswith('{"host": "node-b"') and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(path.read_text())["token"] == lock.owner["token"] and lock.lost is None
        lock.check()
        path.write_text('{"host": "node-c", "pi')  # a newcomer's file, then whole at once
        time.sleep(0.1)
        path.write_text(json.dumps({"host": "node-c", "pid": 7, "started": "then", "token": "x"}))
        deadline = time.monotonic() + 5
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RunFolderInUse, match="taken over by another training \\(host node-c, pid 7"):
            lock.check()
        assert json.loads(path.read_text())["host"] == "node-c"
    finally:
        lock.release()


def test_a_look_finds_a_take_over_the_heartbeat_has_not_seen_yet(tmp_path):
    """check(look=True), before a checkpoint is named and before stale saves are swept, reads the file itself: a
    take-over during the save is found there, not at the next heartbeat (seconds later, after the damage)."""
    lock = RunLock(tmp_path, heartbeat_s=3600)
    lock.acquire()
    try:
        lock.check(look=True)  # still this run's
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-c", "pid": 7, "started": "then", "token": "x"}))
        lock.check()  # by the last heartbeat, still this run's
        with pytest.raises(RunFolderInUse, match=r"taken over by another training \(host node-c, pid 7"):
            lock.check(look=True)
        with pytest.raises(RunFolderInUse, match="host node-c"):
            lock.check()  # and from then on
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-c"
    unreadable = RunLock(tmp_path / "third", heartbeat_s=3600)  # a file-system error is no take-over
    unreadable.acquire()
    path = tmp_path / "third" / LOCK_FILE
    path.rename(path.with_name("aside"))
    path.mkdir()  # reading it fails (IsADirectoryError), as NFS's ESTALE would
    unreadable.check(look=True)
    path.rmdir()
    path.with_name("aside").rename(path)
    unreadable.release()
    assert not path.exists()
    gone = RunLock(tmp_path / "other", heartbeat_s=3600)
    gone.acquire()
    (tmp_path / "other" / LOCK_FILE).unlink()
    with pytest.raises(RunFolderInUse, match="its file was deleted"):
        gone.check(look=True)
    gone.release()


def test_a_beat_that_stalled_while_the_folder_was_taken_over_writes_nothing_over_the_newcomer(tmp_path, monkeypatch):
    """A beat that stalls between reading the file and writing it (a hung file system, a suspended job) for longer
    than stale_s lets a run on another host take the folder over meanwhile. The beat must not then write this
    run's record into the newcomer's file (which would make the newcomer stop, and this run go on): the next beat
    finds the newcomer's, and this run stops."""
    from megatron_dapo.trainer import lock as lock_module

    holder = RunLock(tmp_path, heartbeat_s=3600)  # beats only when the test says
    holder.acquire()
    newcomer = RunLock(tmp_path, stale_s=0.3, host="node-c")
    real = json.dumps

    class StallingJson:  # the holder's beat writes its record after this: the newcomer takes over first
        loads, dump = staticmethod(json.loads), staticmethod(json.dump)

        @staticmethod
        def dumps(value):
            if not newcomer.held:
                newcomer.acquire(say=lambda line: None)
            return real(value)

    try:
        monkeypatch.setattr(lock_module, "json", StallingJson)
        holder._beat(None)
        monkeypatch.undo()
        assert newcomer.held
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == newcomer.owner["token"]
        newcomer.check(look=True)
        holder._beat(None)
        with pytest.raises(RunFolderInUse, match="taken over by another training \\(host node-c"):
            holder.check()
    finally:
        monkeypatch.undo()
        holder.release()
        newcomer.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_file_that_stays_unreadable_stops_the_run(tmp_path):
    """A file that cannot be read (EIO on a soft mount, ESTALE) means beats that do not land either: once the
    last one is older than half of stale_s a run on another host may be about to take the folder over, and
    check(look=True) stops this one rather than let both write there."""
    lock = RunLock(tmp_path, heartbeat_s=3600, stale_s=4.0)
    lock.acquire()
    path = tmp_path / LOCK_FILE
    path.rename(path.with_name("aside"))
    path.mkdir()  # reading it fails (IsADirectoryError), as NFS's ESTALE would
    try:
        lock.check(look=True)  # the last beat is recent (well within 2 s)
        time.sleep(2.1)
        with pytest.raises(RunFolderInUse, match=r"RUNNING cannot be read \(.*\) and this run last refreshed it \d+ s "
                                                 r"ago: after 4 s another training may take the folder over"):
            lock.check(look=True)
    finally:
        path.rmdir()
        path.with_name("aside").rename(path)
        lock.release()
    assert not path.exists()

