"""Brokers, routers and process lifetime: several of each, helpers that shut down,
programs that forget to, and Ctrl-C."""
import os
import signal
import subprocess
import sys
import time

import pytest

import mitogen_native.core
import mitogen_native.master
import mitogen_native.utils
from mitogen_native.core import ChannelError

import remote_helpers
from helpers import pid_alive, run_script


def test_several_routers_on_one_broker(broker):
    a = mitogen_native.master.Router(broker)
    b = mitogen_native.master.Router(broker)
    ca, cb = a.local(), b.local()
    pa, pb = ca.call(os.getpid), cb.call(os.getpid)
    assert pa != pb
    # Shutting one router down leaves the other working.
    a.shutdown()
    with pytest.raises(ChannelError):
        ca.call(os.getpid)
    assert cb.call(os.getpid) == pb


def test_several_brokers():
    brokers = [mitogen_native.master.Broker() for _ in range(3)]
    routers = [mitogen_native.master.Router(b) for b in brokers]
    contexts = [r.local() for r in routers]
    pids = [c.call(os.getpid) for c in contexts]
    # One customer's broker goes; the others are untouched.
    brokers[0].shutdown()
    brokers[0].join()
    assert not pid_alive(pids[0]) or _gone_soon(pids[0])
    assert [c.call(os.getpid) for c in contexts[1:]] == pids[1:]
    for b in brokers[1:]:
        b.shutdown()
        b.join()
    assert not any(pid_alive(p) for p in pids)


def _children(pid):
    """Process ids of `pid`'s children (Linux: /proc/<pid>/task/*/children)."""
    out = []
    try:
        for tid in os.listdir('/proc/%d/task' % pid):
            with open('/proc/%d/task/%s/children' % (pid, tid)) as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _gone_soon(pid, within=15.0):
    deadline = time.monotonic() + within
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not pid_alive(pid)


def test_router_without_broker_and_context_manager():
    with mitogen_native.master.Router() as router:
        pid = router.local().call(os.getpid)
    assert router.broker.shutting_down
    assert not pid_alive(pid)


def test_with_router_decorator():
    @mitogen_native.utils.with_router
    def work(router, n):
        return router.local().call(os.getpid), n

    pid, n = work(7)
    assert n == 7 and not pid_alive(pid)


def test_run_with_router_shuts_down_on_exception():
    pids = []

    def work(router):
        pids.append(router.local().call(os.getpid))
        raise RuntimeError('boom')

    with pytest.raises(RuntimeError):
        mitogen_native.utils.run_with_router(work)
    assert not pid_alive(pids[0])


FORGOTTEN = '''if 1:
    import os, sys, threading, time
    import mitogen_native.master, remote_helpers
    broker = mitogen_native.master.Broker()
    router = mitogen_native.master.Router(broker)
    contexts = [router.local() for _ in range(2)]
    other = mitogen_native.master.Router(mitogen_native.master.Broker())
    contexts.append(other.local())
    print(' '.join(str(c.call(os.getpid)) for c in contexts), flush=True)
    MODE = %r
    if MODE == 'daemon-thread-blocked':
        # Held inside the call until this process is gone (its end of the FIFO
        # closes only then).
        fifo = %r
        t = threading.Thread(target=contexts[0].call, args=(remote_helpers.hold, fifo), daemon=True)
        t.start()
        fd = remote_helpers.open_when_read(fifo)
    if MODE == 'exception':
        raise RuntimeError('uncaught')
'''


@pytest.mark.parametrize('mode', ['normal', 'exception', 'daemon-thread-blocked'])
def test_forgotten_shutdown_exits_promptly_and_leaves_no_children(mode, tmp_path):
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    started = time.monotonic()
    proc = run_script(FORGOTTEN % (mode, fifo), timeout=60)
    elapsed = time.monotonic() - started
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 3, proc.stderr
    if mode == 'exception':
        assert proc.returncode == 1 and 'RuntimeError: uncaught' in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
    assert 'terminate' not in proc.stderr
    # Promptly: not held up by the blocked call, which never ends by itself.
    # About 1 s when idle; the bound only tells "exited" from "waited".
    assert elapsed < 30, 'exit took %.2f s' % elapsed
    assert not any(pid_alive(p) for p in pids)


def test_ctrl_c_during_blocking_call(tmp_path):
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    code = '''if 1:
        import os, sys, time
        import mitogen_native.master, remote_helpers
        broker = mitogen_native.master.Broker()
        router = mitogen_native.master.Router(broker)
        ctx = router.local()
        print(ctx.call(os.getpid), flush=True)
        try:
            ctx.call(remote_helpers.hold, %r)
        except KeyboardInterrupt:
            print('interrupted', flush=True)
            raise
    ''' % fifo
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    fd = remote_helpers.open_when_read(fifo)   # the call is running: we are in call()
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)   # the call itself never ends
    finally:
        os.close(fd)
    assert 'interrupted' in out
    assert 'KeyboardInterrupt' in err
    assert _gone_soon(child)


def test_ctrl_c_during_local():
    # A bootstrap that never finishes (an interpreter that ignores its input).
    code = '''if 1:
        import mitogen_native.master
        router = mitogen_native.master.Router()
        print('ready', flush=True)
        try:
            router.local(python_path=['/bin/sh', '-c', 'sleep 30', 'sh'])
        except KeyboardInterrupt:
            print('interrupted', flush=True)
    '''
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'ready'
    # local() has started the interpreter that never answers: it is waiting.
    deadline = time.monotonic() + 30
    while not _children(proc.pid):
        assert time.monotonic() < deadline, 'local() started nothing'
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert 'interrupted' in out, err
    assert proc.returncode == 0


def test_controller_killed_children_exit(tmp_path):
    # No exit hook runs after SIGKILL: the children must notice on their own,
    # even while busy in a call.
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    code = '''if 1:
        import os, mitogen_native.master, remote_helpers
        router = mitogen_native.master.Router()
        busy, idle = router.local(), router.local()
        print(busy.call(os.getpid), idle.call(os.getpid), flush=True)
        busy.call(remote_helpers.hold, %r)
    ''' % fifo
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    fd = remote_helpers.open_when_read(fifo)   # busy is inside the call
    try:
        proc.kill()
        proc.communicate(timeout=10)
        assert all(_gone_soon(p) for p in pids)
    finally:
        os.close(fd)


SHUT_DOWN = 'the router has been shut down'


@pytest.mark.parametrize('how', ['broker', 'router'])
def test_every_method_refuses_after_shutdown_before_starting_anything(how):
    import threading
    broker = mitogen_native.master.Broker()
    router = mitogen_native.master.Router(broker)
    if how == 'broker':
        broker.shutdown()
    else:
        router.shutdown()
    children, threads = _children(os.getpid()), threading.active_count()
    attempts = {
        'local': lambda: router.local(),
        'local(via=)': lambda: router.local(via=router.myself()),
        'ssh': lambda: router.ssh(hostname='127.0.0.1', port=1),
        'sudo': lambda: router.sudo(),
        'su': lambda: router.su(username='nobody'),
        'doas': lambda: router.doas(),
        'add_handler': lambda: router.add_handler(lambda msg: None),
    }
    for what, attempt in attempts.items():
        with pytest.raises(mitogen_native.core.StreamError) as e:
            attempt()
        assert SHUT_DOWN in str(e.value), what
    # Nothing was started: no child process, no handler thread.
    assert _children(os.getpid()) == children
    assert threading.active_count() == threads
    broker.shutdown()
    broker.join()
