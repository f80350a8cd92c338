"""Calling functions in contexts: call, call_async, call_no_reply, errors, and
what can and cannot be called."""
import copy
import os
import signal
import threading
import time

import pytest

import mitogen_native.core
from mitogen_native.core import CallError, ChannelError, StreamError, TimeoutError

import remote_helpers
from helpers import pid_alive


def test_call_stdlib_functions(context):
    pid = context.call(os.getpid)
    assert pid != os.getpid() and pid_alive(pid)
    assert context.call(copy.copy, {'a': 1}) == {'a': 1}
    assert context.call(remote_helpers.add, 2, b=3) == 5


def test_call_classmethod_staticmethod_and_builtin_methods(context):
    assert context.call(remote_helpers.Calculator.double, 21) == 42
    assert context.call(remote_helpers.Calculator.triple, 2) == 6
    assert context.call(str.upper, 'abc') == 'ABC'
    assert context.call(dict.fromkeys, ['a']) == {'a': None}
    assert context.call(dict, a=1) == {'a': 1}


def _renamed():
    pass


def _with_objclass():
    pass


def test_a_function_is_named_by_its_attributes_as_they_are_now(context):
    """What the child looks up is what getattr() says at the time of the call
    (the extension reads functions' fields directly): names set at run time,
    and an __objclass__ in a function's __dict__, as for a built-in class's
    method."""
    assert context.call(_renamed) is None
    _renamed.__module__, _renamed.__name__, _renamed.__qualname__ = 'os', 'getpid', 'getpid'
    pid = context.call(_renamed)
    assert pid != os.getpid() and pid_alive(pid)
    _renamed.__module__, _renamed.__qualname__ = 'remote_helpers', 'Calculator.double'
    _renamed.__name__ = 'double'
    assert context.call(_renamed, 21) == 42
    _with_objclass.__objclass__ = str
    _with_objclass.__name__ = 'upper'
    assert context.call(_with_objclass, 'abc') == 'ABC'
    _with_objclass.__objclass__ = 'not a type'   # ignored, as before
    _with_objclass.__module__, _with_objclass.__qualname__ = 'os', 'getcwd'
    _with_objclass.__name__ = 'getcwd'
    assert context.call(_with_objclass) == context.call(os.getcwd)


def test_uncallable_things_are_refused(context):
    def nested():
        pass
    x = 1

    def closure():
        return x
    with pytest.raises(TypeError, match='lambda'):
        context.call(lambda: 1)
    with pytest.raises(TypeError, match='inside functions'):
        context.call(nested)
    with pytest.raises(TypeError, match='closure'):
        context.call(closure)
    with pytest.raises(TypeError, match='instance methods'):
        context.call(remote_helpers.Calculator().instance_method)
    with pytest.raises(TypeError, match='instance methods'):
        context.call('abc'.upper)
    with pytest.raises(TypeError, match='missing the function'):
        context.call()


def test_call_argument_errors_name_the_argument(context):
    # Context.call takes its arguments as a vectorcall: positional and keyword
    # values are converted as call_async's are, with the same paths in errors.
    with pytest.raises(TypeError, match=r"at args\[1\]"):
        context.call(max, 1, object())
    with pytest.raises(TypeError, match=r"at kwargs\['key'\]"):
        context.call(sorted, [1], key=os.getpid)
    assert context.call(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]


def test_call_on_an_uninitialised_context_subclass_raises(context):
    # Context.call reads the C++ object without pybind11's lookup only when it
    # exists; otherwise pybind11's own error, not a crash.
    class Bare(mitogen_native.core.Context):
        def __init__(self):
            pass
    with pytest.raises(TypeError, match='__init__'):
        Bare().call(os.getpid)
    with pytest.raises(TypeError):
        mitogen_native.core.Context.call(5, os.getpid)


def test_call_error_carries_type_message_and_traceback(context):
    with pytest.raises(CallError) as exc:
        context.call(remote_helpers.raise_value_error, 'boom')
    e = exc.value
    assert isinstance(e, mitogen_native.core.Error)
    assert e.type_name == 'builtins.ValueError'
    assert e.remote_message == 'boom'
    assert 'raise_value_error' in e.remote_traceback
    assert str(e).startswith('builtins.ValueError: boom\n')
    assert 'remote_helpers.py' in str(e)


def test_call_error_for_missing_function_or_module(context):
    with pytest.raises(CallError, match='ModuleNotFoundError'):
        context.call(type('f', (), {'__module__': 'no_such_module_xyz', '__name__': 'f'}))


def test_call_async(context):
    recv = context.call_async(remote_helpers.add, 40, 2)
    assert recv.get() == 42
    assert recv.get() == 42  # the result stays available
    assert recv.ready()
    failing = context.call_async(remote_helpers.raise_value_error, 'late')
    with pytest.raises(CallError, match='late'):
        failing.get()


def test_call_async_overlaps(context):
    started = time.monotonic()
    recvs = [context.call_async(remote_helpers.sleep, 0.2) for _ in range(3)]
    # Calls run one at a time in the context, in order.
    assert [r.get() for r in recvs] == [0.2] * 3
    assert time.monotonic() - started >= 0.6


def test_get_timeout(context):
    recv = context.call_async(remote_helpers.sleep, 0.5)
    with pytest.raises(TimeoutError):
        recv.get(timeout=0.05)
    assert recv.get() == 0.5


def test_call_no_reply(context, tmp_path):
    path = tmp_path / 'written'
    assert context.call_no_reply(remote_helpers.write_file, str(path)) is None
    # Calls run in order: once a later call returned, the earlier one has run.
    context.call(os.getpid)
    assert path.read_text() == 'ran'
    # Failures are only logged in the context; the context carries on.
    context.call_no_reply(remote_helpers.raise_value_error, 'ignored')
    assert context.call(remote_helpers.add, 1, 1) == 2


def test_calls_from_many_threads(context):
    errors = []

    def worker(n):
        try:
            for i in range(100):
                assert context.call(remote_helpers.add, n, i) == n + i
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n * 1000,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_blocking_call_releases_the_gil(context):
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        context.call(remote_helpers.sleep, 0.3)
    finally:
        stop.set()
        t.join()
    assert counter[0] > 10000


def test_child_killed_mid_call(router, tmp_path):
    ctx = router.local()
    pid = ctx.call(os.getpid)
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    recv = ctx.call_async(remote_helpers.hold, fifo)
    fd = remote_helpers.open_when_read(fifo)    # the child is inside the call
    try:
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ChannelError):
            recv.get(timeout=30)    # the call never ends by itself
    finally:
        os.close(fd)
    with pytest.raises(ChannelError):
        ctx.call(os.getpid)


def test_stopped_child_times_out_and_others_keep_working(router):
    stopped, other = router.local(), router.local()
    pid = stopped.call(os.getpid)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            stopped.call_async(os.getpid).get(timeout=0.5)
        assert 0.45 <= time.monotonic() - started < 15   # the timeout, not a hang
        assert other.call(os.getpid) not in (pid, os.getpid())
    finally:
        os.kill(pid, signal.SIGCONT)
    assert stopped.call(os.getpid) == pid


def test_context_shutdown(router):
    ctx = router.local()
    pid = ctx.call(os.getpid)
    ctx.shutdown(wait=True)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(pid)
    with pytest.raises(ChannelError):
        ctx.call(os.getpid)


def test_context_shutdown_no_wait_then_timeout(router):
    ctx = router.local()
    ctx.call_no_reply(remote_helpers.sleep, 0.3)
    ctx.shutdown()  # does not block
    with pytest.raises(TimeoutError):
        ctx.shutdown(wait=True, timeout=0.05)
    ctx.shutdown(wait=True, timeout=5)


def test_local_options(router):
    import sys
    ctx = router.local(python_path=sys.executable, connect_timeout=10, name='label')
    assert ctx.name == 'label'
    assert ctx.call(os.getpid) > 0
    with pytest.raises(StreamError):
        router.local(python_path='/nonexistent/python3')
    with pytest.raises(TypeError, match='via= must be a Context'):
        router.local(via='label')   # via= itself: test_via.py
    with pytest.raises(TypeError, match='unexpected keyword'):
        router.local(no_such_option=1)


def test_calls_after_shutdown_fail_fast(broker, router):
    ctx = router.local()
    broker.shutdown()
    broker.join()
    with pytest.raises(ChannelError):
        ctx.call(os.getpid)
    with pytest.raises(StreamError):
        router.local()
