import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_master  # noqa: E402

# A module the agent can import: placed on PYTHONPATH of the child.
TESTMOD = textwrap.dedent('''
    import os
    import sys


    def echo(value):
        return value


    def add(a, b, scale=1):
        return (a + b) * scale


    def fail(message):
        raise ValueError(message)


    def nested_fail():
        return fail('deep down')


    def return_set():
        return {1, 2}


    def return_function():
        return echo


    def return_object():
        return object()


    def say(text, stream='stdout'):
        getattr(sys, stream).write(text)


    def log(text, level=20, name='agent_testmod'):
        import logging
        logging.getLogger(name).log(level, text)


    def log_exception():
        import logging
        try:
            1 / 0
        except ZeroDivisionError:
            logging.getLogger('agent_testmod').exception('it broke')


    def exit_now():
        sys.exit(3)


    def deep(n):
        value = []
        for _ in range(n):
            value = [value]
        return value


    # White-box helpers for the leader/follower reader: nothing in the
    # protocol needs a reply inside the agent yet (GET_MODULE will), so these
    # use the agent's internals directly.
    def request_parent(handle, text):
        import time
        import mitogen.core as core
        reply_handle, slot = core._inbox.open_slot()
        try:
            core._send(0, handle, text.encode(), reply_to=reply_handle)
            return core._inbox.wait(slot).data, time.monotonic()
        finally:
            core._inbox.close_slot(reply_handle)


    _threads = {}


    def request_in_thread_from(peer, handle, text):
        """As request_in_thread, but asks context `peer` through a reply slot
        that accepts only `peer` (open_slot(peer))."""
        import threading
        import mitogen.core as core

        def run():
            reply_handle, slot = core._inbox.open_slot(peer)
            try:
                core._send(peer, handle, text.encode(), reply_to=reply_handle)
                msg = core._inbox.wait(slot)
                _threads[text] = bytes(msg.data), msg.is_dead
            finally:
                core._inbox.close_slot(reply_handle)
        threading.Thread(target=run, daemon=True).start()


    def request_in_thread(handle, text):
        import threading
        import mitogen.core as core
        sent = threading.Event()
        real_send = core._send

        def run():
            _threads[text] = request_parent(handle, text)

        # Return only once the request is on the wire, so that the test's
        # frame order is deterministic.
        def send_and_signal(*args, **kwargs):
            real_send(*args, **kwargs)
            sent.set()
        core._send = send_and_signal
        try:
            threading.Thread(target=run, daemon=True).start()
            sent.wait(5)
        finally:
            core._send = real_send


    def thread_result(text):
        import time
        deadline = time.monotonic() + 5
        while text not in _threads and time.monotonic() < deadline:
            time.sleep(0.01)
        return _threads[text]


    def meta_path():
        return [type(finder).__name__ for finder in sys.meta_path]


    def real_functools():
        import functools
        return (functools.partial(max, 1)(2), functools.reduce(max, [1, 5, 2]),
                hasattr(functools, 'lru_cache'))


    def timed_sleep(seconds):
        import time
        time.sleep(seconds)
        return time.monotonic()


    def hold(path):
        # Inside a call until the test opens, then closes, FIFO `path`
        # (once the test can open it for writing, the call has started).
        with open(path, 'rb') as f:
            return len(f.read())


    class Thing(object):
        @staticmethod
        def triple(x):
            return 3 * x
''')


@pytest.fixture
def testmod_env(tmp_path):
    (tmp_path / 'agent_testmod.py').write_text(TESTMOD)
    env = dict(os.environ)
    env['PYTHONPATH'] = str(tmp_path)
    return env


@pytest.fixture
def master(testmod_env):
    m = fake_master.FakeMaster(env=testmod_env)
    yield m
    m.kill()


@pytest.fixture
def spawn(testmod_env):
    """Factory for masters with custom options; all are killed afterwards."""
    masters = []

    def factory(**kwargs):
        kwargs.setdefault('env', testmod_env)
        m = fake_master.FakeMaster(**kwargs)
        masters.append(m)
        return m
    yield factory
    for m in masters:
        m.kill()
