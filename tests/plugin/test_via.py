"""via=: contexts started by other contexts (docs/via.md), through the Python
API: who spawned whom, modules two hops away served from the intermediary's
cache, failure fan-out when an intermediary dies, DEL_ROUTE on a normal exit,
sibling messages and their source checks, SSH at either end of a hop."""
import getpass
import os
import signal
import time

import pytest

import mitogen_native.core
import mitogen_native.master
import remote_helpers
import via_helpers
from helpers import pid_alive

from servers import CAN_RUN_SSHD, ssh_kwargs


def test_three_level_chain_each_started_by_its_parent(router):
    a = router.local()
    b = router.local(via=a)
    c = router.local(via=b)
    a_pid, b_pid, c_pid = (x.call(os.getpid) for x in (a, b, c))
    assert a.call(os.getppid) == os.getpid()
    assert b.call(os.getppid) == a_pid
    assert c.call(os.getppid) == b_pid
    assert len({os.getpid(), a_pid, b_pid, c_pid}) == 4
    assert b.name.startswith(a.name + '.') and c.name.startswith(b.name + '.')
    # call_async and exceptions work as for any context.
    assert c.call_async(pow, 2, 10).get() == 1024
    with pytest.raises(mitogen_native.core.CallError, match='ZeroDivisionError'):
        c.call(divmod, 1, 0)


def test_a_module_only_the_controller_has_two_hops_away(tmp_path, monkeypatch):
    (tmp_path / 'viahop_mod.py').write_text(
        'import os\n'
        'def where():\n    return "viahop", os.getpid()\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import viahop_mod
    broker = mitogen_native.master.Broker()
    try:
        router = mitogen_native.master.Router(broker)
        a = router.local()
        b1 = router.local(via=a)
        b2 = router.local(via=a)
        tag, pid = b1.call(viahop_mod.where)
        assert tag == 'viahop' and pid == b1.call(os.getpid)
        before = router._module_stats()
        assert before['requests'] >= 1
        # The second grandchild is served from the intermediary's cache: the
        # master sees no further request, and never sent anything to either.
        assert b2.call(viahop_mod.where)[1] == b2.call(os.getpid)
        c = router.local(via=b2)
        assert c.call(viahop_mod.where)[0] == 'viahop'
        after = router._module_stats()
        assert after['requests'] == before['requests']
        assert after['modules_sent'] == before['modules_sent']
        assert 'viahop_mod' in router._modules_sent_to(a.context_id)
        for ctx in (b1, b2, c):
            assert router._modules_sent_to(ctx.context_id) == []
    finally:
        broker.shutdown()
        broker.join()


def test_killing_the_intermediary_fails_pending_and_new_calls_at_once(router, tmp_path):
    a = router.local()
    b = router.local(via=a)
    a_pid, b_pid = a.call(os.getpid), b.call(os.getpid)
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    pending = b.call_async(remote_helpers.hold, fifo)
    fd = remote_helpers.open_when_read(fifo)    # b is inside the call
    try:
        os.kill(a_pid, signal.SIGKILL)
        # "At once": long before anything else could end the call (it never
        # ends by itself); the bound only has to tell the two apart.
        t0 = time.monotonic()
        with pytest.raises(mitogen_native.core.ChannelError, match='disconnected'):
            pending.get(timeout=30)
        assert time.monotonic() - t0 < 15
    finally:
        os.close(fd)
    with pytest.raises(mitogen_native.core.ChannelError):
        b.call(os.getpid)
    # The orphaned grandchild notices its parent is gone and exits.
    deadline = time.monotonic() + 10
    while pid_alive(b_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(b_pid)


def test_a_grandchild_shut_down_normally_is_reported_gone(router):
    a = router.local()
    b = router.local(via=a)
    b_pid = b.call(os.getpid)
    b.shutdown(wait=True, timeout=10)
    with pytest.raises(mitogen_native.core.ChannelError):
        b.call(os.getpid)   # fails at once: no route
    deadline = time.monotonic() + 10
    while pid_alive(b_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(b_pid)
    # The intermediary carries on and can start another.
    assert router.local(via=a).call(os.getppid) == a.call(os.getpid)


def test_siblings_message_each_other_with_verified_sources(router):
    x = router.local()
    y = router.local()
    z = router.local(via=y)
    h = y.call(via_helpers.open_slot)
    assert x.call(via_helpers.send, y.context_id, h, b'hello')
    assert y.call(via_helpers.recv, h) == (x.context_id, x.context_id, b'hello')
    # Down into another child's subtree, and up from one.
    hz = z.call(via_helpers.open_slot)
    assert x.call(via_helpers.send, z.context_id, hz, b'to z')
    assert z.call(via_helpers.recv, hz) == (x.context_id, x.context_id, b'to z')
    hx = x.call(via_helpers.open_slot)
    assert z.call(via_helpers.send, x.context_id, hx, b'from z')
    assert x.call(via_helpers.recv, hx) == (z.context_id, z.context_id, b'from z')


def test_a_child_cannot_spoof_a_sibling(router):
    x = router.local()
    y = router.local()
    z = router.local(via=y)
    h = y.call(via_helpers.open_slot)
    # x claims to be z (routed through y) and then y itself; the master drops
    # both, so the first message y sees is x's genuine one.
    assert x.call(via_helpers.forge, y.context_id, h, z.context_id, b'forged')
    assert x.call(via_helpers.forge, y.context_id, h, y.context_id, b'forged')
    assert x.call(via_helpers.send, y.context_id, h, b'genuine')
    assert y.call(via_helpers.recv, h) == (x.context_id, x.context_id, b'genuine')
    # z, through its intermediary, cannot claim to be x either.
    assert z.call(via_helpers.forge, y.context_id, h, x.context_id, b'forged')
    assert z.call(via_helpers.send, y.context_id, h, b'from z')
    assert y.call(via_helpers.recv, h) == (z.context_id, z.context_id, b'from z')


def test_unknown_via_and_failed_starts_are_clear(router):
    a = router.local()
    with pytest.raises(TypeError):
        router.local(via='not a context')
    with pytest.raises(mitogen_native.core.StreamError, match='nonexistent'):
        router.local(via=a, python_path='/nonexistent/python3')
    a.shutdown(wait=True, timeout=10)
    with pytest.raises(mitogen_native.core.ChannelError):
        router.local(via=a)


needs_sshd = pytest.mark.skipif(
    not CAN_RUN_SSHD, reason='needs root and openssh-server for a loopback sshd')


@needs_sshd
def test_ssh_then_local_through_it(sshd, router):
    s = router.ssh(**ssh_kwargs(sshd))
    b = router.local(via=s)
    assert b.call(getpass.getuser) == sshd['user']
    assert b.call(os.getppid) == s.call(os.getpid)


@needs_sshd
def test_ssh_started_by_a_local_context(sshd, router):
    a = router.local()
    s = router.ssh(via=a, **ssh_kwargs(sshd))
    assert s.name.startswith(a.name + '.ssh.127.0.0.1')
    assert s.call(getpass.getuser) == sshd['user']
    assert s.call(os.getpid) != a.call(os.getpid)
    with pytest.raises(mitogen_native.core.StreamError):
        router.ssh(via=a, **dict(ssh_kwargs(sshd), known_hosts_file='/dev/null',
                                 check_host_keys='enforce'))


def test_files_move_to_and_from_a_grandchild_and_between_branches(router, tmp_path):
    # put_file/get_file/copy_file address contexts by id: the intermediary
    # relays the chunks and acknowledgements like any other message.
    import hashlib
    a = router.local()
    grandchild = router.local(via=a)
    other = router.local()
    src = tmp_path / 'src'
    block = os.urandom(1 << 20)
    src.write_bytes(block * 5 + b'tail')
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dst = tmp_path / 'dst'
    assert grandchild.put_file(str(src), str(dst), mode=0o640) == src.stat().st_size
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == digest
    assert dst.stat().st_mode & 0o7777 == 0o640
    back = tmp_path / 'back'
    assert grandchild.get_file(str(dst), str(back)) == src.stat().st_size
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    copied = tmp_path / 'copied'
    grandchild.copy_file(str(dst), other, str(copied))
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == digest
