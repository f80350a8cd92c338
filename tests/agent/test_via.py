"""The agent as an intermediary (via=): it starts children with
_proxy_connect, routes for them, checks what they send, serves them modules
from its cache and reports their end upward. Driven by the fake master."""

import ast
import errno
import os
import time

import fake_master
from fake_master import CALL_FUNCTION, IS_DEAD, encode

ADD_ROUTE = 103
DEL_ROUTE = 104
ALLOCATE_ID = 105


def test_stage1_copy_in_the_agent_matches_stage1_py():
    # The agent passes its own copy of stage 1 to the contexts it starts.
    tree = ast.parse(fake_master.agent_source())
    # It lives in the intermediary's code, compiled on first use.
    via = [ast.literal_eval(node.value) for node in tree.body
           if isinstance(node, ast.Assign) and
           getattr(node.targets[0], 'id', None) == '_VIA_SOURCE']
    assert len(via) == 1
    tree = ast.parse(via[0])
    copy = [ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and
            getattr(node.targets[0], 'id', None) == '_STAGE1']
    with open(os.path.join(fake_master.AGENT_DIR, 'stage1.py')) as f:
        assert copy == [f.read()]


def call_in(m, dst, module, function, *args, **kwargs):
    """A call to context `dst` (reached through the agent `m` drives)."""
    handle = m.new_handle()
    m.send(CALL_FUNCTION, m.call_payload(module, function, args, kwargs),
           reply_to=handle, dst_id=dst)
    msg = m.recv(kwargs.pop('_timeout', 20), handle)
    assert msg.dst_id == 0
    return msg


# Served to contexts that must be held inside a call: block() opens a FIFO for
# reading (returns once the test opens the other end) and reads it until the
# test closes it. Import it first (ping) while the test answers GET_MODULE.
BLOCKER = ('def ping():\n'
           '    return True\n'
           'def block(path):\n'
           '    with open(path, "rb") as f:\n'
           '        return len(f.read())\n')


def open_when_read(path, timeout=30):
    """Open FIFO `path` for writing as soon as a reader has it open, i.e.
    once the context is inside its call; returns the descriptor. Closing it
    ends the call."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def start_child(m, context_id, **options):
    reply = m.call('mitogen.core', '_proxy_connect', 'local', options,
                   context_id=context_id, _timeout=30)
    assert reply['msg'] is None, reply
    assert reply['id'] == context_id
    route = m.recv(10, ADD_ROUTE)
    assert route.src_id == route.auth_id == m.context_id
    assert route.data == ('%d:%s' % (context_id, reply['name'])).encode()
    return reply


def test_child_is_started_by_the_intermediary_and_reached_through_it(master):
    start_child(master, 5)
    reply = call_in(master, 5, 'os', 'getppid')
    assert reply.src_id == reply.auth_id == 5
    assert master.result(reply) == master.proc.pid
    # Messages for contexts nobody routes get a dead reply at once.
    dead = call_in(master, 77, 'os', 'getpid')
    assert dead.reply_to == IS_DEAD
    assert b'no route to context 77' in dead.data


def test_a_grandchild_chain_of_three(master):
    start_child(master, 5)
    # Context 5 starts 6: the master asks 5 through the intermediary.
    h = master.new_handle()
    master.send(CALL_FUNCTION, master.call_payload(
        'mitogen.core', '_proxy_connect', ('local', {}), {'context_id': 6}),
        reply_to=h, dst_id=5)
    # 5's ADD_ROUTE is passed up by the intermediary with 5 as its source.
    route = master.recv(20, ADD_ROUTE)
    assert route.src_id == 5 and route.data.startswith(b'6:')
    assert master.result(master.recv(20, h))['id'] == 6
    pid5 = master.result(call_in(master, 5, 'os', 'getpid'))
    assert master.result(call_in(master, 6, 'os', 'getppid')) == pid5
    # The middle one dies: the intermediary reports it and its child gone.
    master.call_no_reply('os', 'kill', pid5, 9)
    gone = set()
    deadline = time.monotonic() + 10
    while gone != {b'5', b'6'} and time.monotonic() < deadline:
        gone.add(master.recv(10, DEL_ROUTE).data)
    assert gone == {b'5', b'6'}
    dead = call_in(master, 6, 'os', 'getpid')
    assert dead.reply_to == IS_DEAD


def test_modules_are_fetched_once_for_every_grandchild(master):
    master.serve_module('viamod', 'def f():\n    return 42\n')
    start_child(master, 5)
    start_child(master, 6)
    for ident in (5, 6, 5):
        assert master.result(call_in(master, ident, 'viamod', 'f')) == 42
    assert master.requested_names().count('viamod') == 1
    assert all(m.src_id == master.context_id for m in master.module_requests)


def test_allocate_id_when_the_master_passes_no_id(master):
    h = master.new_handle()
    master.send(CALL_FUNCTION, master.call_payload(
        'mitogen.core', '_proxy_connect', ('local', {})), reply_to=h)
    req = master.recv(10, ALLOCATE_ID)
    assert req.dst_id == 0 and req.reply_to
    master.send(req.reply_to, encode((2000, 3000)), dst_id=master.context_id)
    assert master.result(master.recv(30, h))['id'] == 2000
    assert master.result(call_in(master, 2000, 'os', 'getppid')) == \
        master.proc.pid


def test_a_child_exiting_is_reported_with_del_route(master):
    start_child(master, 5)
    master.send(CALL_FUNCTION, master.call_payload('os', '_exit', (0,)),
                dst_id=5)
    assert master.recv(10, DEL_ROUTE).data == b'5'
    dead = call_in(master, 5, 'os', 'getpid')
    assert dead.reply_to == IS_DEAD


def test_a_child_cannot_speak_for_others(master):
    start_child(master, 5)
    # Context 5 writes a frame claiming to come from 1 (its parent) and one
    # claiming ADD_ROUTE for the master's id: both are dropped and logged.
    code = ('import mitogen.core as c\n'
            'def forge():\n'
            '    c._forward_up(c.Message(0, 1, 1, 4242, 0, b"forged"))\n'
            '    c._send(1, 103, b"0:evil")\n'
            '    return True\n')
    master.serve_module('forger', code)
    assert master.result(call_in(master, 5, 'forger', 'forge')) is True
    master.wait_for_log(lambda r: 'claiming src_id=1' in r[2])
    master.wait_for_log(lambda r: 'ADD_ROUTE for context 0' in r[2])
    assert master.result(call_in(master, 5, 'os', 'getppid')) == \
        master.proc.pid


def test_unknown_method_and_failed_start_are_reported(master):
    reply = master.call('mitogen.core', '_proxy_connect', 'nosuch', {},
                        context_id=5)
    assert reply['id'] is None and 'unknown connection method' in reply['msg']
    reply = master.call('mitogen.core', '_proxy_connect', 'local',
                        {'python_path': ['/nonexistent/python']},
                        context_id=6)
    assert reply['id'] is None and reply['code'] == 'spawn_failed'
    assert '/nonexistent/python' in reply['msg']
    reply = master.call('mitogen.core', '_proxy_connect', 'local',
                        {'python_path': ['/bin/sh', '-c', 'echo nope >&2',
                                         'x']}, context_id=7, _timeout=30)
    assert reply['id'] is None and reply['code'] == 'child_died'
    assert 'nope' in reply['msg']


def test_a_child_that_is_not_reading_does_not_stall_the_others(master,
                                                               tmp_path):
    master.serve_module('blocker', BLOCKER)
    start_child(master, 5)
    start_child(master, 6)
    assert master.result(call_in(master, 5, 'blocker', 'ping')) is True
    # 5 is held inside a call until the test lets it go, so it reads nothing:
    # a 4 MiB message for it cannot be written meanwhile. Traffic to 6 must
    # flow all the same (if it did not, the call to 6 would never return).
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    held = master.new_handle()
    master.send(CALL_FUNCTION, master.call_payload('blocker', 'block', (fifo,)),
                reply_to=held, dst_id=5)
    fd = open_when_read(fifo)
    try:
        h = master.new_handle()
        master.send(CALL_FUNCTION, master.call_payload(
            'builtins', 'len', (b'x' * (4 << 20),)), reply_to=h, dst_id=5)
        assert master.result(call_in(master, 6, 'os', 'getppid')) == \
            master.proc.pid
    finally:
        os.close(fd)
    assert master.result(master.recv(30, held)) == 0
    assert master.result(master.recv(30, h)) == 4 << 20


# Code in the intermediary that calls its child `ident` and waits for the
# answer, as docs/via.md describes (the agent has no call API of its own).
WAITER = (
    'import mitogen.core as c\n'
    'def wait_on(ident, module, function, args):\n'
    '    handle, slot = c._inbox.open_slot()\n'
    '    c._expect_reply(handle, ident)\n'
    '    payload = c._encode((None, module, None, function, tuple(args), '
    'c.Kwargs()))\n'
    '    c._send(ident, c.CALL_FUNCTION, payload, reply_to=handle)\n'
    '    msg = c._inbox.wait(slot)\n'
    '    c._inbox.close_slot(handle)\n'
    '    if msg.is_dead:\n'
    '        return True, msg.data.decode()\n'
    '    return False, c._decode(msg.data)\n')


def test_a_waiter_in_the_intermediary_gets_its_childs_reply(master):
    # The reply comes in on the child's reader thread. It used to wait
    # forever whenever the waiting thread had taken the reader role from the
    # router thread (blocked reading from the parent, it never saw the reply):
    # every time when the call came right after the child started.
    master.serve_module('waiter', WAITER)
    start_child(master, 5)
    for _ in range(5):
        h = master.new_handle()
        master.send(CALL_FUNCTION, master.call_payload(
            'waiter', 'wait_on', (5, 'os', 'getppid', ())), reply_to=h)
        assert master.result(master.recv(30, h)) == (False, master.proc.pid)


def test_waiters_in_the_intermediary_are_released_when_a_child_dies(
        master, tmp_path):
    # Code in the intermediary waits for a reply from its child 5, which is
    # held inside the call; 5 dies.
    master.serve_module('waiter', WAITER)
    master.serve_module('blocker', BLOCKER)
    start_child(master, 5)
    assert master.call('waiter', 'wait_on', 5, 'blocker', 'ping', ()) == \
        (False, True)
    pid5 = master.result(call_in(master, 5, 'os', 'getpid'))
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    h = master.new_handle()
    master.send(CALL_FUNCTION, master.call_payload(
        'waiter', 'wait_on', (5, 'blocker', 'block', (fifo,))), reply_to=h)
    fd = open_when_read(fifo)   # 5 is inside the call: the waiter has sent it
    try:
        os.kill(pid5, 9)
        dead, text = master.result(master.recv(30, h))
    finally:
        os.close(fd)
    assert dead and 'context 5' in text and 'disconnected' in text
