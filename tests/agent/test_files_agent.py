"""The agent's side of file transfer (_file_receive / _file_send; wire format
in docs/protocol.md "File transfer"), driven by the pure-Python fake master, so
that the agent's own checks and clean-up are tested without the C++ master."""
import os
import struct
import time

import pytest

import fake_master

ACK = struct.Struct('>Q')
HEADER = struct.Struct('>QL')


class Sender(object):
    """Pickles as mitogen.core._unpickle_sender(context_id, handle)."""
    def __init__(self, context_id, handle):
        self.context_id, self.handle = context_id, handle

    def __reduce__(self):
        return (fake_master._wire('_unpickle_sender'), (self.context_id, self.handle))


def start_receive(m, path, size, ack_bytes=1 << 20, mode=0o644):
    """Call _file_receive; returns (reply handle, ack handle, data handle)."""
    reply, ack = m.new_handle(), m.new_handle()
    m.send(fake_master.CALL_FUNCTION,
           m.call_payload('mitogen.core', '_file_receive',
                          (path, size, mode, None, None, Sender(0, ack), ack_bytes)),
           reply_to=reply)
    ready = m.recv(handle=ack)
    assert ACK.unpack(ready.data) == (0,) and ready.reply_to >= 1000
    return reply, ack, ready.reply_to


def temps(d):
    return [n for n in os.listdir(str(d)) if n.endswith('.tmp')]


def test_receive_writes_acknowledges_and_renames(master, tmp_path):
    dst = str(tmp_path / 'dst')
    reply, ack, data = start_receive(master, dst, 10, ack_bytes=4)
    assert len(temps(tmp_path)) == 1 and not os.path.exists(dst)
    for piece in (b'abcd', b'efgh', b'ij'):
        master.send(data, piece)
    assert ACK.unpack(master.recv(handle=ack).data) == (4,)
    assert ACK.unpack(master.recv(handle=ack).data) == (8,)
    assert master.result(master.recv(handle=reply)) == 10
    with open(dst, 'rb') as f:
        assert f.read() == b'abcdefghij'
    assert os.stat(dst).st_mode & 0o7777 == 0o644
    assert temps(tmp_path) == []


def test_receive_refuses_more_than_announced(master, tmp_path):
    dst = tmp_path / 'dst'
    dst.write_bytes(b'old')
    reply, ack, data = start_receive(master, str(dst), 3)
    master.send(data, b'abcd')
    with pytest.raises(fake_master.RemoteError) as e:
        master.result(master.recv(handle=reply))
    assert 'more than the 3 announced' in e.value.args[0]
    assert dst.read_bytes() == b'old'
    assert temps(tmp_path) == []
    # Chunks still in flight are swallowed quietly until the master's dead
    # message; after it, the handle is gone again.
    master.send(data, b'late')
    master.send(data, b'stop', reply_to=fake_master.IS_DEAD)
    assert master.call('os', 'getpid') == master.pid
    assert not [l for l in master.logs if 'dropped' in l[2]]


def test_receive_stops_when_the_sender_gives_up(master, tmp_path):
    dst = tmp_path / 'dst'
    dst.write_bytes(b'old')
    reply, ack, data = start_receive(master, str(dst), 100)
    master.send(data, b'x' * 10)
    master.send(data, b'cancelled by the test', reply_to=fake_master.IS_DEAD)
    with pytest.raises(fake_master.RemoteError) as e:
        master.result(master.recv(handle=reply))
    assert 'the sender gave up: cancelled by the test' in e.value.args[0]
    assert dst.read_bytes() == b'old'
    assert temps(tmp_path) == []


def test_parent_hang_up_removes_the_temporary_file(spawn, tmp_path):
    m = spawn()
    start_receive(m, str(tmp_path / 'dst'), 100)
    assert len(temps(tmp_path)) == 1
    m.close()                 # the parent goes away mid-transfer
    m.proc.wait(timeout=30)
    assert temps(tmp_path) == []
    assert not os.path.exists(str(tmp_path / 'dst'))


def test_parent_unable_to_read_removes_the_temporary_file(spawn, tmp_path):
    """The parent stops reading (its end of our output closes) while it still
    sends: the acknowledgement we owe it fails with EPIPE, and the agent must
    clean up on that way out too, not only on end of input."""
    m = spawn(use_pipes=True)
    _, _, data = start_receive(m, str(tmp_path / 'dst'), 100, ack_bytes=4)
    assert len(temps(tmp_path)) == 1
    os.close(m._rfd)          # our output has nowhere to go; our input stays open
    try:
        m.send(data, b'abcdefgh')  # owes an acknowledgement, which fails
        m.proc.wait(timeout=30)
    finally:
        os.close(m._wfd)
        m._rfd = m._wfd = None
    assert temps(tmp_path) == []
    assert not os.path.exists(str(tmp_path / 'dst'))


def test_send_streams_chunks_within_the_window(master, tmp_path):
    src = tmp_path / 'src'
    src.write_bytes(bytes(range(256)) * 100)      # 25600 bytes
    os.chmod(str(src), 0o604)
    reply, data = master.new_handle(), master.new_handle()
    master.send(fake_master.CALL_FUNCTION,
                master.call_payload('mitogen.core', '_file_send',
                                    (str(src), Sender(0, data), 4096, 8192)),
                reply_to=reply)
    head = master.recv(handle=data)
    assert HEADER.unpack(head.data) == (25600, 0o604)
    ack = head.reply_to
    got = b''
    while len(got) < 25600:
        # Never more than the window (8192) unacknowledged: two chunks.
        window = b''
        while len(window) < 8192 and len(got) + len(window) < 25600:
            chunk = master.recv(handle=data).data
            assert 0 < len(chunk) <= 4096
            window += chunk
        if len(got) + len(window) < 25600:
            with pytest.raises(TimeoutError):
                master.recv(handle=data, timeout=0.3)
        got += window
        master.send(ack, ACK.pack(len(got)))
    assert got == src.read_bytes()
    assert master.result(master.recv(handle=reply)) == 25600
