"""Functions the file-transfer tests (test_files.py) call inside contexts,
including stand-ins for the agent's transfer functions that misbehave on
purpose, to check that the master holds its ground against a hostile child."""
import hashlib
import os
import sys
import time


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                return h.hexdigest()
            h.update(block)


def stat_file(path):
    st = os.stat(path)
    return st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_size


def listdir(path):
    return sorted(os.listdir(path))


def _core():
    return sys.modules['mitogen.core']


def install(name):
    """Replace the agent's transfer function with one of the hostile ones below
    (for the rest of this context's life)."""
    core = _core()
    fn = globals()[name]
    if name.startswith('send_'):
        core._file_send = fn
    else:
        core._file_receive = fn
    return True


def _header(core, data_to, size, handle):
    core._send(data_to.context.context_id, data_to.dst_handle,
               core._FILE_HEADER.pack(size, 0o644), reply_to=handle)


def send_more_than_announced(path, data_to, chunk_size, window):
    """Announces 10 bytes, then sends a whole chunk."""
    core = _core()
    handle, slot = core._inbox.open_slot()
    _header(core, data_to, 10, handle)
    core._send(data_to.context.context_id, data_to.dst_handle, b'x' * chunk_size)
    return 10


def send_ignoring_flow_control(path, data_to, chunk_size, window):
    """Announces 1 GiB and sends it all without waiting for acknowledgements
    (the pipe blocks us once the master disconnects; we die with it)."""
    core = _core()
    handle, slot = core._inbox.open_slot()
    size = 1 << 30
    _header(core, data_to, size, handle)
    block = b'y' * chunk_size
    for _ in range(size // chunk_size):
        core._send(data_to.context.context_id, data_to.dst_handle, block)
    return size


def receive_once_gone(pid):
    """Make this context's next _file_receive start only once process `pid`
    has exited (or is a zombie), then run the real one. Holds the master's
    copy_file() before it consumes anything from its source."""
    core = _core()
    real = core._file_receive

    def receive(*args):
        core._file_receive = real
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with open('/proc/%d/stat' % pid) as f:
                    if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                        break
            except OSError:
                break
            time.sleep(0.01)
        return real(*args)
    core._file_receive = receive
    return True


def send_then_hang(path, data_to, chunk_size, window):
    """Announces 1 MiB, sends 1000 bytes, then never sends anything again."""
    core = _core()
    handle, slot = core._inbox.open_slot()
    _header(core, data_to, 1 << 20, handle)
    core._send(data_to.context.context_id, data_to.dst_handle, b'z' * 1000)
    time.sleep(3600)


def receive_with_garbage_ack(path, size, mode, owner, group, ack_to, ack_bytes):
    """Starts properly, then acknowledges more than was ever sent."""
    core = _core()
    handle, slot = core._inbox.open_slot()
    peer, h = ack_to.context.context_id, ack_to.dst_handle
    core._send(peer, h, core._FILE_ACK.pack(0), reply_to=handle)
    core._inbox.wait(slot)
    core._send(peer, h, core._FILE_ACK.pack(1 << 40))
    core._send(peer, h, b'garbage')
    time.sleep(3600)


def times():
    """CPU seconds (user, system) used by this context so far."""
    t = os.times()
    return t[0], t[1]


def handler_count():
    """Handlers registered in the agent's inbox (a failed receive must not leave
    its chunk-swallowing handler behind once the master said it stopped)."""
    return len(_core()._inbox._handlers)
