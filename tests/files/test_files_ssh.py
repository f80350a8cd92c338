"""File transfer over the loopback sshd (tests/core/context/ssh/sshd_fixture.py): the
remote user is the unprivileged `mitogen-test`. Needs root, as CI has."""
import errno
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import mitogen_native.core
import file_helpers
from servers import ssh_kwargs

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists('/usr/sbin/sshd'),
    reason='needs root and openssh-server for a loopback sshd')

FileError = mitogen_native.core.FileError
BIG = 2 << 30      # 2 GiB


@pytest.fixture
def user_dir(sshd):
    """A directory the remote user may write (not under a 0700 pytest dir)."""
    d = tempfile.mkdtemp(prefix='mitogen-files-', dir='/var/tmp')
    pw = pwd.getpwnam(sshd['user'])
    os.chown(d, pw.pw_uid, pw.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_big_file(path, size):
    """`size` bytes: one random 1 MiB block repeated, each copy starting with
    its own counter, so a misplaced or repeated chunk changes the hash. Returns
    the sha256."""
    block = bytearray(os.urandom(1 << 20))
    h = hashlib.sha256()
    with open(path, 'wb') as f:
        for n in range(size >> 20):
            block[:8] = n.to_bytes(8, 'big')
            f.write(block)
            h.update(block)
    return h.hexdigest()


# Runs in a fresh interpreter so that VmHWM (the peak RSS) says what the
# transfer itself cost: it is read before and after.
TRANSFER_SCRIPT = r'''
import json, os, sys, time
import mitogen_native.master
import file_helpers
kw = json.loads(sys.argv[1])
src, dst, small = sys.argv[2], sys.argv[3], sys.argv[4]

def status(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])

broker = mitogen_native.master.Broker()
router = mitogen_native.master.Router(broker)
ctx = router.ssh(**kw)
ctx.put_file(small, dst + '.warm-up')          # first use: everything loaded
ctx.call(file_helpers.sha256_file, dst + '.warm-up')
before = status('VmHWM')
start = time.monotonic()
n = ctx.put_file(src, dst, timeout=120)
seconds = time.monotonic() - start
after = status('VmHWM')
remote_sha = ctx.call(file_helpers.sha256_file, dst)
print(json.dumps(dict(bytes=n, seconds=seconds, hwm_before_kib=before,
                      hwm_after_kib=after, remote_sha=remote_sha)))
broker.shutdown()
broker.join()
'''


def test_2gib_over_ssh_is_identical_and_memory_bounded(sshd, user_dir, tmp_path):
    started = time.monotonic()
    src = str(tmp_path / 'big')
    small = str(tmp_path / 'small')
    with open(small, 'wb') as f:
        f.write(os.urandom(3 << 20))
    try:
        sha = make_big_file(src, BIG)
        dst = os.path.join(user_dir, 'big')
        proc = subprocess.run(
            [sys.executable, '-c', TRANSFER_SCRIPT, json.dumps(ssh_kwargs(sshd)), src, dst, small],
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out['bytes'] == BIG
        assert out['remote_sha'] == sha
        growth = out['hwm_after_kib'] - out['hwm_before_kib']
        assert growth < 64 * 1024, 'controller peak RSS grew by %d KiB' % growth
        st = os.stat(dst)
        assert st.st_uid == pwd.getpwnam(sshd['user']).pw_uid and st.st_size == BIG
        assert [n for n in os.listdir(user_dir) if n.endswith('.tmp')] == []
        sys.stderr.write('2 GiB over ssh: %.1f s (%.0f MiB/s), peak RSS growth %d KiB, '
                         'test total %.1f s\n' % (out['seconds'], 2048 / out['seconds'],
                                                  growth, time.monotonic() - started))
    finally:
        for p in (src, os.path.join(user_dir, 'big')):
            if os.path.exists(p):
                os.unlink(p)


def test_permission_denied_over_ssh(sshd, router, tmp_path):
    ctx = router.ssh(**ssh_kwargs(sshd))
    locked = tempfile.mkdtemp(prefix='mitogen-files-ro-', dir='/var/tmp')   # root's, 0700
    try:
        old = os.path.join(locked, 'dst')
        with open(old, 'wb') as f:
            f.write(b'old')
        os.chmod(locked, 0o755)
        src = tmp_path / 'src'
        src.write_bytes(b'new content')
        with pytest.raises(FileError) as e:
            ctx.put_file(str(src), old)
        assert e.value.errno == errno.EACCES and 'Permission denied' in str(e.value)
        with open(old, 'rb') as f:
            assert f.read() == b'old'
        assert os.listdir(locked) == ['dst']

        # Fetching a file the remote user may not read.
        os.chmod(old, 0o600)
        local = str(tmp_path / 'fetched')
        with pytest.raises(FileError) as e:
            ctx.get_file(old, local)
        assert e.value.errno == errno.EACCES
        assert not os.path.exists(local)
        assert [n for n in os.listdir(str(tmp_path)) if n.endswith('.tmp')] == []
    finally:
        shutil.rmtree(locked, ignore_errors=True)


def test_round_trip_over_ssh(sshd, router, user_dir, tmp_path):
    ctx = router.ssh(**ssh_kwargs(sshd))
    src = str(tmp_path / 'src')
    with open(src, 'wb') as f:
        f.write(os.urandom(5 * (1 << 20) + 77))
    remote = os.path.join(user_dir, 'x')
    ctx.put_file(src, remote, mode=0o640)
    assert ctx.call(file_helpers.stat_file, remote)[0] == 0o640
    back = str(tmp_path / 'back')
    assert ctx.get_file(remote, back) == 5 * (1 << 20) + 77
    assert file_helpers.sha256_file(back) == file_helpers.sha256_file(src)


def test_ssh_connection_cut_during_put(sshd, router, user_dir, tmp_path):
    """Killing the sshd session processes mid-transfer: an error within a
    bound, nothing at the destination name."""
    import threading
    ctx = router.ssh(**ssh_kwargs(sshd))
    pid = ctx.call(os.getpid)
    src = str(tmp_path / 'src')
    with open(src, 'wb') as f:
        f.truncate(4 << 30)
    dst = os.path.join(user_dir, 'cut')
    out = {}

    def run():
        try:
            ctx.put_file(src, dst, timeout=60)
        except BaseException as e:
            out['error'] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not [n for n in os.listdir(user_dir) if n.endswith('.tmp')]:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # The sshd session process serving this connection is the child's parent.
    with open('/proc/%d/stat' % pid) as f:
        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
    os.kill(ppid, 9)
    start = time.monotonic()
    t.join(60)
    assert not t.is_alive()
    assert time.monotonic() - start < 60
    assert isinstance(out.get('error'), FileError), out
    assert not os.path.exists(dst)
    # The agent removes its temporary file when its parent hangs up.
    deadline = time.monotonic() + 30
    while [n for n in os.listdir(user_dir) if n.endswith('.tmp')]:
        assert time.monotonic() < deadline, os.listdir(user_dir)
        time.sleep(0.05)
