"""File transfer: Context.put_file / get_file / copy_file (docs/files.md).

Every test is bounded: transfers get an idle timeout, threads are joined with a
timeout, and the tmpfs mounts are undone in `finally`. Needs root for the
mounts and chown (as CI has); those tests are skipped otherwise."""
import contextlib
import errno
import glob
import hashlib
import os
import signal
import subprocess
import threading
import time

import pytest

import mitogen_native.core
import mitogen_native.master

import file_helpers
import remote_helpers

FileError = mitogen_native.core.FileError
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason='needs root (mount, chown)')


def sha256(path):
    return file_helpers.sha256_file(path)


def write_random(path, size, seed=0):
    block = hashlib.sha256(str(seed).encode()).digest() * 32768   # 1 MiB
    with open(path, 'wb') as f:
        left = size
        n = 0
        while left:
            piece = block[:left] if left < len(block) else block
            f.write(n.to_bytes(8, 'big') + piece[8:] if len(piece) >= 8 else piece)
            left -= len(piece)
            n += 1


def temp_files(directory):
    return [n for n in os.listdir(directory) if n.endswith('.tmp')]


@contextlib.contextmanager
def tmpfs(path, size='4m', ro=False):
    os.makedirs(path, exist_ok=True)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=%s' % size, 'tmpfs', path],
                   check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', path], timeout=30)


@pytest.fixture
def ctx(router):
    return router.local(remote_name='files')


# ---- 1. byte-identical copies, mode and owner


@pytest.mark.parametrize('size', [0, 1, 5000, (1 << 20) - 1, 3 * (1 << 20) + 12345])
def test_put_and_get_are_byte_identical(ctx, tmp_path, size):
    src = str(tmp_path / 'src')
    write_random(src, size, seed=size)
    os.chmod(src, 0o640)
    remote = str(tmp_path / 'remote')
    assert ctx.put_file(src, remote) == size
    assert ctx.call(file_helpers.sha256_file, remote) == sha256(src)
    assert ctx.call(file_helpers.stat_file, remote)[0] == 0o640   # source's mode by default
    back = str(tmp_path / 'back')
    assert ctx.get_file(remote, back) == size
    assert sha256(back) == sha256(src)
    assert os.stat(back).st_mode & 0o7777 == 0o640
    assert temp_files(str(tmp_path)) == []


def test_small_chunks_and_window_one(ctx, tmp_path):
    src = str(tmp_path / 'src')
    write_random(src, 300001, seed=7)
    remote = str(tmp_path / 'remote')
    ctx.put_file(src, remote, chunk_size=4096, window=1)
    assert ctx.call(file_helpers.sha256_file, remote) == sha256(src)
    back = str(tmp_path / 'back')
    ctx.get_file(remote, back, chunk_size=1000, window=3)
    assert sha256(back) == sha256(src)


def test_put_replaces_an_existing_file(ctx, tmp_path):
    dst = tmp_path / 'dst'
    dst.write_bytes(b'old content' * 1000)
    src = tmp_path / 'src'
    src.write_bytes(b'new')
    ctx.put_file(str(src), str(dst))
    assert dst.read_bytes() == b'new'


@needs_root
def test_mode_owner_and_group_are_applied(ctx, tmp_path):
    src = str(tmp_path / 'src')
    write_random(src, 10000)
    remote = str(tmp_path / 'remote')
    ctx.put_file(src, remote, mode=0o604, owner='nobody', group='nogroup')
    assert ctx.call(file_helpers.stat_file, remote) == (0o604, 65534, 65534, 10000)
    back = str(tmp_path / 'back')
    ctx.get_file(remote, back, mode=0o600, owner=65534, group=0)
    st = os.stat(back)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 65534, 0)


def test_unknown_owner_is_an_error_and_nothing_is_written(ctx, tmp_path):
    src = tmp_path / 'src'
    src.write_bytes(b'data')
    with pytest.raises(FileError) as e:
        ctx.put_file(str(src), str(tmp_path / 'dst'), owner='no-such-user-4711')
    assert 'no-such-user-4711' in str(e.value)
    assert e.value.errno == errno.EINVAL   # docs/files.md: the errno behind it
    assert os.listdir(str(tmp_path)) == ['src']


@pytest.mark.parametrize('method, kwargs', [
    ('put_file', dict(group='no-such-group-4711')),
    ('get_file', dict(owner='no-such-user-4711')),
    ('get_file', dict(group='no-such-group-4711')),
])
def test_unknown_owner_or_group_is_einval_both_ways(ctx, tmp_path, method, kwargs):
    src = tmp_path / 'src'
    src.write_bytes(b'data')
    with pytest.raises(FileError) as e:
        getattr(ctx, method)(str(src), str(tmp_path / 'dst'), **kwargs)
    assert e.value.errno == errno.EINVAL
    assert list(kwargs.values())[0] in str(e.value)
    assert os.listdir(str(tmp_path)) == ['src']


def test_missing_source_is_enoent(ctx, tmp_path):
    with pytest.raises(FileError) as e:
        ctx.get_file(str(tmp_path / 'nope'), str(tmp_path / 'dst'))
    assert e.value.errno == errno.ENOENT and 'No such file' in str(e.value)
    with pytest.raises(FileError) as e:
        ctx.put_file(str(tmp_path / 'nope'), str(tmp_path / 'dst'))
    assert e.value.errno == errno.ENOENT
    assert os.listdir(str(tmp_path)) == []
    assert isinstance(e.value, OSError)


def test_copy_between_two_contexts(router, tmp_path):
    a = router.local(remote_name='a')
    b = router.local(remote_name='b')
    src = str(tmp_path / 'src')
    write_random(src, 5 * (1 << 20) + 3, seed=3)
    dst = str(tmp_path / 'dst')
    assert a.copy_file(src, b, dst, mode=0o600) == 5 * (1 << 20) + 3
    assert b.call(file_helpers.sha256_file, dst) == sha256(src)
    assert os.stat(dst).st_mode & 0o7777 == 0o600


def test_a_transfer_queued_behind_a_long_call_does_not_time_out(ctx, tmp_path):
    # The agent runs one call at a time: the transfer starts once the held
    # call ends. `timeout` bounds silence during the transfer, not the queueing.
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    busy = ctx.call_async(remote_helpers.hold, fifo)
    fd = remote_helpers.open_when_read(fifo)     # the context is inside that call
    src = tmp_path / 'src'
    src.write_bytes(b'queued')
    t, out = _run_in_thread(lambda: ctx.put_file(str(src), str(tmp_path / 'dst'), timeout=1))
    try:
        time.sleep(2.5)     # queued for longer than the timeout (a lower bound: never too short)
    finally:
        os.close(fd)
    t.join(30)
    assert not t.is_alive()
    assert out.get('result') == 6, out
    assert (tmp_path / 'dst').read_bytes() == b'queued'
    busy.get(timeout=30)


def test_concurrent_transfers_to_one_context(ctx, tmp_path):
    srcs = []
    for i in range(3):
        src = str(tmp_path / ('src%d' % i))
        write_random(src, (2 << 20) + i, seed=i)
        srcs.append(src)
    threads = [_run_in_thread(lambda s=s: ctx.put_file(s, s + '.out', chunk_size=65536))
               for s in srcs]
    for t, out in threads:
        t.join(60)
        assert not t.is_alive() and 'error' not in out, out
    for s in srcs:
        assert sha256(s + '.out') == sha256(s)


def test_copy_within_one_context_is_refused(ctx, tmp_path):
    src = tmp_path / 'src'
    src.write_bytes(b'x')
    with pytest.raises(FileError) as e:
        ctx.copy_file(str(src), ctx, str(tmp_path / 'dst'))
    assert e.value.errno == errno.EINVAL and 'within one context' in str(e.value)
    assert os.listdir(str(tmp_path)) == ['src']


# ---- 3, 4, 5. full and read-only filesystems


@needs_root
def test_put_into_full_filesystem(ctx, tmp_path):
    mnt = str(tmp_path / 'mnt')
    with tmpfs(mnt, '4m'):
        old = os.path.join(mnt, 'dst')
        with open(old, 'wb') as f:
            f.write(b'old file' * 1000)
        src = str(tmp_path / 'src')
        write_random(src, 8 << 20)
        handlers = ctx.call(file_helpers.handler_count)
        with pytest.raises(FileError) as e:
            ctx.put_file(src, old, timeout=30, chunk_size=65536)
        assert 'No space left on device' in str(e.value)
        assert e.value.errno == errno.ENOSPC
        with open(old, 'rb') as f:
            assert f.read() == b'old file' * 1000
        assert temp_files(mnt) == []
        # The context still works after the failure, and kept nothing behind.
        assert ctx.call(file_helpers.listdir, mnt) == ['dst']
        assert ctx.call(file_helpers.handler_count) == handlers


@needs_root
def test_get_into_full_filesystem(ctx, tmp_path):
    mnt = str(tmp_path / 'mnt')
    src = str(tmp_path / 'src')
    write_random(src, 8 << 20)
    with tmpfs(mnt, '4m'):
        old = os.path.join(mnt, 'dst')
        with open(old, 'wb') as f:
            f.write(b'old')
        with pytest.raises(FileError) as e:
            ctx.get_file(src, old, timeout=30)
        assert 'No space left on device' in str(e.value)
        assert e.value.errno == errno.ENOSPC
        with open(old, 'rb') as f:
            assert f.read() == b'old'
        assert temp_files(mnt) == []
    assert ctx.call(file_helpers.sha256_file, src) == sha256(src)


@needs_root
def test_put_into_read_only_filesystem(ctx, tmp_path):
    mnt = str(tmp_path / 'mnt')
    with tmpfs(mnt, '1m'):
        old = os.path.join(mnt, 'dst')
        with open(old, 'wb') as f:
            f.write(b'old')
        subprocess.run(['mount', '-o', 'remount,ro', mnt], check=True, timeout=30)
        src = tmp_path / 'src'
        src.write_bytes(b'new')
        with pytest.raises(FileError) as e:
            ctx.put_file(str(src), old)
        assert e.value.errno == errno.EROFS and 'Read-only file system' in str(e.value)
        with pytest.raises(FileError) as e:
            ctx.get_file(str(src), old)
        assert e.value.errno == errno.EROFS
        with open(old, 'rb') as f:
            assert f.read() == b'old'
        assert os.listdir(mnt) == ['dst']


# ---- 6. the connection cut mid-transfer


def _run_in_thread(fn):
    out = {}

    def run():
        try:
            out['result'] = fn()
        except BaseException as e:
            out['error'] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _wait_for(pred, timeout=30):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, 'condition not met in time'
        time.sleep(0.001)


def test_child_killed_during_put(router, tmp_path):
    ctx = router.local(remote_name='victim')
    pid = ctx.call(os.getpid)
    src = str(tmp_path / 'src')
    with open(src, 'wb') as f:
        f.truncate(2 << 30)                # sparse: quick to make, 2 GiB to send
    dst = str(tmp_path / 'dst')
    with open(dst, 'wb') as f:
        f.write(b'old')
    t, out = _run_in_thread(lambda: ctx.put_file(src, dst, chunk_size=65536, window=2))
    _wait_for(lambda: temp_files(str(tmp_path)) and
              os.path.getsize(os.path.join(str(tmp_path), temp_files(str(tmp_path))[0])) > 0)
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    assert time.monotonic() - start < 30
    assert isinstance(out.get('error'), FileError), out
    assert out['error'].errno == errno.EPIPE
    with open(dst, 'rb') as f:
        assert f.read() == b'old'


def test_child_killed_during_get(router, tmp_path):
    ctx = router.local(remote_name='victim')
    pid = ctx.call(os.getpid)
    src = str(tmp_path / 'src')
    with open(src, 'wb') as f:
        f.truncate(2 << 30)
    local_dir = tmp_path / 'local'
    local_dir.mkdir()
    dst = str(local_dir / 'dst')
    t, out = _run_in_thread(lambda: ctx.get_file(src, dst, chunk_size=65536, window=2))
    _wait_for(lambda: temp_files(str(local_dir)))
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    assert time.monotonic() - start < 30
    assert isinstance(out.get('error'), FileError), out
    assert 'disconnected' in str(out['error'])
    assert out['error'].errno == errno.EPIPE
    assert os.listdir(str(local_dir)) == []     # neither dst nor a temp file


def test_keyboard_interrupt_cancels_a_transfer(ctx, tmp_path):
    src = str(tmp_path / 'src')
    with open(src, 'wb') as f:
        f.truncate(4 << 30)
    dst = str(tmp_path / 'dst')
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ctx.put_file(src, dst, chunk_size=65536, window=2)
    assert time.monotonic() - start < 30
    # The child removes its temporary file once told the sender gave up.
    _wait_for(lambda: temp_files(str(tmp_path)) == [])
    assert not os.path.exists(dst)
    assert ctx.call(os.getpid) > 0


# ---- 7. hostile children


def _rss_kib():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])


def test_child_sending_more_than_announced(ctx, tmp_path):
    ctx.call(file_helpers.install, 'send_more_than_announced')
    dst = str(tmp_path / 'dst')
    with pytest.raises(FileError) as e:
        ctx.get_file('/etc/hostname', dst, timeout=30)
    assert 'more than the 10 bytes it announced' in str(e.value)
    assert e.value.errno == errno.EPROTO
    assert os.listdir(str(tmp_path)) == []


def test_child_ignoring_flow_control(router, tmp_path):
    # The hostile source sends 1 GiB without waiting for acknowledgements. The
    # master must notice whatever the speeds: if it wrote chunks as fast as they
    # came, it would acknowledge them in time and no window would be broken
    # (get_file() under load once did just that). So the copy goes to a second
    # context that starts receiving only once the source is gone: until then
    # the master consumes nothing and acknowledges nothing, the source's
    # window is broken for certain, and being disconnected for it is what ends
    # the source (its next write fails) and lets the destination start.
    src = router.local(remote_name='flooder')
    dst = router.local(remote_name='held')
    src.call(file_helpers.install, 'send_ignoring_flow_control')
    dst.call(file_helpers.receive_once_gone, src.call(os.getpid))
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    before = _rss_kib()
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kib())
            time.sleep(0.01)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with pytest.raises(FileError) as e:
            src.copy_file('/etc/hostname', dst, str(out_dir / 'dst'), timeout=30)
    finally:
        stop.set()
        sampler.join(5)
    assert 'ignored flow control' in str(e.value)
    assert e.value.errno == errno.EPROTO
    # At most the window (8 chunks of 1 MiB) was kept of what it sent.
    assert (peak[0] - before) < 64 * 1024, 'RSS grew by %d KiB' % (peak[0] - before)
    # The destination was told to give up and removed its temporary file.
    _wait_for(lambda: os.listdir(str(out_dir)) == [])
    assert dst.call(os.getpid) > 0


def test_child_that_never_finishes(ctx, tmp_path):
    ctx.call(file_helpers.install, 'send_then_hang')
    dst = str(tmp_path / 'dst')
    start = time.monotonic()
    with pytest.raises(FileError) as e:
        ctx.get_file('/etc/hostname', dst, timeout=1.5)
    assert 'no progress' in str(e.value)
    assert e.value.errno == errno.ETIMEDOUT
    assert 1.0 < time.monotonic() - start < 30
    assert os.listdir(str(tmp_path)) == []


def test_child_sending_garbage_acks(ctx, tmp_path):
    ctx.call(file_helpers.install, 'receive_with_garbage_ack')
    src = str(tmp_path / 'src')
    write_random(src, 10 << 20)
    with pytest.raises(FileError) as e:
        ctx.put_file(src, str(tmp_path / 'dst'), timeout=30)
    assert 'acknowledged' in str(e.value) or 'malformed acknowledgement' in str(e.value)
