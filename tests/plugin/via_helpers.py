"""Functions the via= tests run inside contexts (imported there from
PYTHONPATH, see conftest.py): raw messaging between contexts with the agent's
own primitives."""
import mitogen.core as c

_slots = {}


def open_slot():
    """A reply handle in this context whose messages recv() returns."""
    handle, slot = c._inbox.open_slot()
    _slots[handle] = slot
    return handle


def recv(handle):
    """The next message to `handle`: (src_id, auth_id, data)."""
    msg = c._inbox.wait(_slots[handle])
    return msg.src_id, msg.auth_id, bytes(msg.data)


def send(dst_id, handle, data):
    c._send(dst_id, handle, data)
    return True


def forge(dst_id, handle, src_id, data):
    """Write a frame claiming to come from `src_id`, straight to our parent."""
    c._forward_up(c.Message(dst_id, src_id, src_id, handle, 0, data))
    return True


def cmdline_contains_upwards(pid, text):
    """Whether `text` appears on the command line of `pid` or any ancestor."""
    needle = text.encode()
    while pid > 1:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            if needle in f.read():
                return True
        with open('/proc/%d/stat' % pid) as f:
            pid = int(f.read().rsplit(')', 1)[1].split()[1])
    return False
