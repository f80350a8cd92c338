"""Upstream Mitogen names a program may already use (issue 13 §7):
Context.shutdown() returning something with get(timeout=...), Router.disconnect
and disconnect_all, Context.remote_name, Context.send and utils.cast."""
import collections
import enum
import getpass
import os
import socket
import time

import pytest

import mitogen_native.core
import mitogen_native.master
import mitogen_native.utils

import channel_helpers
import remote_helpers
from helpers import pid_alive


def _gone(pid, within=15.0):
    deadline = time.monotonic() + within
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not pid_alive(pid)


def test_shutdown_returns_a_latch_whose_get_waits(router):
    ctx = router.local()
    pid = ctx.call(os.getpid)
    latch = ctx.shutdown()
    assert latch.get(timeout=30) is None
    assert latch.ready()
    with pytest.raises(mitogen_native.core.ChannelError):
        ctx.call(os.getpid)
    assert _gone(pid)
    # wait=True waits first and returns the same kind of object.
    other = router.local()
    assert other.shutdown(wait=True, timeout=30).ready()


def test_shutdown_latch_get_times_out_while_the_context_is_busy(router, tmp_path):
    ctx = router.local()
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    pending = ctx.call_async(remote_helpers.hold, fifo)
    fd = remote_helpers.open_when_read(fifo)   # the context is inside the call
    latch = ctx.shutdown()          # honoured once the current call ends
    with pytest.raises(mitogen_native.core.TimeoutError):
        latch.get(timeout=0.2)
    assert not latch.ready()
    os.close(fd)                    # ends the call
    assert pending.get(timeout=30) == 0
    latch.get(timeout=30)


def test_disconnect_ends_calls_in_progress_and_the_child(router, tmp_path):
    ctx = router.local()
    pid = ctx.call(os.getpid)
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    pending = ctx.call_async(remote_helpers.hold, fifo)
    fd = remote_helpers.open_when_read(fifo)   # the context is inside the call
    router.disconnect(ctx)
    with pytest.raises(mitogen_native.core.ChannelError):
        pending.get(timeout=30)
    os.close(fd)
    assert _gone(pid)
    # The router keeps working.
    assert router.local().call(os.getpid) != pid


def test_disconnect_all_leaves_the_router_usable(router):
    contexts = [router.local() for _ in range(3)]
    pids = [c.call(os.getpid) for c in contexts]
    router.disconnect_all()
    for c in contexts:
        with pytest.raises(mitogen_native.core.ChannelError):
            c.call(os.getpid)
    assert all(_gone(p) for p in pids)
    assert router.local().call(os.getpid) not in pids


def test_disconnect_of_a_context_reached_through_another_does_nothing(router):
    parent = router.local()
    child = router.local(via=parent)
    router.disconnect(child)        # upstream: only direct streams
    assert child.call(os.getpid) != parent.call(os.getpid)
    with pytest.raises(TypeError):
        router.disconnect('not a context')


def test_remote_name(router):
    default = '%s@%s:%d' % (getpass.getuser(), socket.gethostname(), os.getpid())
    assert router.local().remote_name == default
    assert router.local(remote_name='titled').remote_name == 'titled'
    assert router.context_by_id(4242).remote_name is None


def test_context_send_delivers_to_a_receiver(router):
    me = router.myself()
    rx = mitogen_native.core.Receiver(router)
    me.send(mitogen_native.core.Message.pickled({'k': [1, 2]}, handle=rx.handle))
    assert rx.get(timeout=30).unpickle() == {'k': [1, 2]}
    with pytest.raises(TypeError):
        me.send({'not': 'a message'})
    with pytest.raises(TypeError):
        me.send(mitogen_native.core.Message.pickled({1, 2}, handle=rx.handle))


def test_context_send_to_a_child_receiver(router):
    ctx = router.local()
    sender = ctx.call(channel_helpers.make_receiver)
    ctx.send(mitogen_native.core.Message.pickled('ping', handle=sender.dst_handle))
    assert ctx.call(channel_helpers.get_one) == (0, 'ping')
    # A message received here can be passed on as it is.
    rx = mitogen_native.core.Receiver(router)
    router.myself().send(mitogen_native.core.Message.pickled(['x'], handle=rx.handle))
    msg = rx.get(timeout=30)
    msg.handle = sender.dst_handle
    ctx.send(msg)
    assert ctx.call(channel_helpers.get_one) == (0, ['x'])


class Colour(enum.IntEnum):
    RED = 1


class Text(str):
    pass


def test_cast_gives_plain_types(context):
    Point = collections.namedtuple('Point', 'x y')
    value = {
        'od': collections.OrderedDict([('a', 1)]),
        'dd': collections.defaultdict(list, {'b': [Colour.RED]}),
        'nt': Point(1, 2),
        'text': Text('t'),
        'tuple': (1, b'x', None, True, 1.5),
    }
    with pytest.raises(TypeError):
        context.call(remote_helpers.identity, value)
    cast = mitogen_native.utils.cast(value)
    assert type(cast['od']) is dict and type(cast['dd']) is dict
    assert type(cast['dd']['b'][0]) is int and type(cast['text']) is str
    assert context.call(remote_helpers.identity, cast) == {
        'od': {'a': 1}, 'dd': {'b': [1]}, 'nt': [1, 2], 'text': 't',
        'tuple': [1, b'x', None, True, 1.5]}
    assert mitogen_native.utils.cast(context) is context
    with pytest.raises(TypeError):
        mitogen_native.utils.cast({1, 2})


# -- exceptions programs tell apart without parsing text (issue 13 §6) -------

def test_stream_error_subclasses_have_upstream_names_and_codes(router):
    import mitogen_native.parent
    import mitogen_native.ssh
    import mitogen_native.sudo
    import mitogen_native.su
    import mitogen_native.doas
    core = mitogen_native.core
    assert mitogen_native.ssh.HostKeyError is core.HostKeyError
    assert mitogen_native.parent.EofError is core.EofError
    for m in (mitogen_native.ssh, mitogen_native.sudo, mitogen_native.su, mitogen_native.doas):
        assert m.PasswordError is core.PasswordError
    for cls in (core.EofError, core.HostKeyError, core.PasswordError, core.ConnectTimeoutError):
        assert issubclass(cls, core.StreamError)
    assert issubclass(core.ConnectTimeoutError, core.TimeoutError)
    # A local child that exits during start-up: EofError, code child_died.
    with pytest.raises(mitogen_native.parent.EofError) as e:
        router.local(python_path='/bin/false')
    assert e.value.code in ('child_died', 'bootstrap_failed')
    # An interpreter that cannot be started at all keeps the plain class.
    with pytest.raises(core.StreamError) as e:
        router.local(python_path='/nonexistent/python')
    assert e.value.code == 'spawn_failed'
    assert not isinstance(e.value, core.EofError)


def test_connection_refused_is_eof_error(router):
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(mitogen_native.core.EofError) as e:
        router.ssh(hostname='127.0.0.1', port=port, connect_timeout=20)
    assert e.value.code == 'host_unreachable'


def test_connect_timeout_is_both_stream_and_timeout_error(router):
    # A listener that never answers the SSH handshake.
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    s.listen(1)
    try:
        with pytest.raises(mitogen_native.core.TimeoutError) as e:
            router.ssh(hostname='127.0.0.1', port=s.getsockname()[1], connect_timeout=0.5)
        assert isinstance(e.value, mitogen_native.core.StreamError)
        assert e.value.code == 'connect_timeout'
    finally:
        s.close()


def test_shut_down_router_error_has_its_code(broker):
    router = mitogen_native.master.Router(broker)
    broker.shutdown()
    with pytest.raises(mitogen_native.core.StreamError) as e:
        router.local()
    assert e.value.code == 'broker_shut_down'


def test_no_docstring_shows_a_cpp_name():
    import mitogen_native.master
    core = mitogen_native.core
    for cls in (core.Context, core.CallReceiver, core.ShutdownLatch, core.Receiver,
                mitogen_native.master.Router, mitogen_native.master.Broker):
        for attr in dir(cls):
            doc = getattr(getattr(cls, attr, None), '__doc__', None) or ''
            assert 'mitogen::' not in doc, (cls, attr, doc)
