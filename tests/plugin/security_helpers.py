"""What a hostile context does to its neighbours (tests/plugin/test_security.py):
raw CALL_FUNCTION and SHUTDOWN messages written with the agent's own primitives,
as the attack in issue 10 does, and frames with forged headers. Imported inside
contexts (conftest.py puts this directory on their PYTHONPATH)."""
import os
import pickle

import mitogen.core as c


def _call_payload(module, function, args):
    return pickle.dumps((None, module, None, function, tuple(args), c.Kwargs({})),
                        protocol=2)


def run_as(path):
    """The payload the attacks try to make their victim run: record who ran it."""
    return 'id > %s' % (path,)


def attack_call(dst_id, path, timeout=20.0):
    """Ask context `dst_id` to run os.system(run_as(path)) and wait for the answer:
    ('dead', reason) if refused, ('ok', result) if it obeyed."""
    handle, slot = c._inbox.open_slot()
    try:
        c._send(dst_id, c.CALL_FUNCTION,
                _call_payload('os', 'system', (run_as(path),)), reply_to=handle)
        msg = c._chan_wait(slot, timeout)
    finally:
        c._inbox.close_slot(handle)
    if msg.is_dead:
        return 'dead', bytes(msg.data).decode('utf-8', 'replace')
    return 'ok', c._decode(msg.data)


def attack_fire_and_forget(dst_id, path):
    """The attack exactly as issue 10 wrote it: no reply asked for."""
    c._send(dst_id, c.CALL_FUNCTION, _call_payload('os', 'system', (run_as(path),)))
    return True


def attack_shutdown(dst_id):
    c._send(dst_id, c.SHUTDOWN, b'')
    return True


def forge(dst_id, src_id, auth_id, path, handle=c.CALL_FUNCTION):
    """Write a CALL_FUNCTION frame with the header fields we choose, straight to
    our parent's stream (bypassing _send, which always writes our own ids)."""
    data = _call_payload('os', 'system', (run_as(path),)) if handle == c.CALL_FUNCTION else b''
    c._forward_up(c.Message(dst_id, src_id, auth_id, handle, 0, data))
    return True


def context_id():
    return c.context_id


def exists(path):
    return os.path.exists(path)
