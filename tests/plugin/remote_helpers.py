"""Functions the tests call inside contexts. Children import this module by name:
conftest.py puts this directory on the PYTHONPATH they inherit."""
import logging
import os
import sys
import time


def echo(*args, **kwargs):
    return args, kwargs


def identity(value):
    return value


def add(a, b):
    return a + b


def type_names(*args):
    """What the child received, by exact type name (to check conversions)."""
    return [type(a).__name__ for a in args]


def raise_value_error(text):
    raise ValueError(text)


def return_set():
    return {1, 2, 3}


def return_object():
    return object()


def sleep(seconds):
    time.sleep(seconds)
    return seconds


def getpid():
    return os.getpid()


def cmdline():
    with open('/proc/self/cmdline', 'rb') as f:
        return f.read()


def write_file(path, *_):
    with open(path, 'w') as f:
        f.write('ran')


def say(text):
    print(text)
    sys.stdout.flush()


def warn(text):
    logging.getLogger('remote_helpers').warning('%s', text)


class Calculator(object):
    @classmethod
    def double(cls, n):
        return 2 * n

    @staticmethod
    def triple(n):
        return 3 * n

    def instance_method(self):
        return 'nope'


# Holding a context inside a call, without guessing how long it takes to get there:
# the context runs hold(fifo); the test calls open_when_read(fifo), which returns
# once the context has the FIFO open (so it is inside the call) and gives the test
# the write end; closing it ends the call. Make the FIFO with os.mkfifo().

def hold(path):
    """Block until the other end of FIFO `path` is opened and closed again."""
    with open(path, 'rb') as f:
        return len(f.read())


def open_when_read(path, timeout=30):
    """In the test: the write end of FIFO `path`, once a reader has it open."""
    import errno
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def print_lines(n, width=0):
    """Print n numbered lines (padded to `width` characters) as fast as print() goes."""
    for i in range(n):
        print(('line %d' % i).ljust(width))
    return n


def flood_log_records(n):
    """Send n FORWARD_LOG records straight to the master, past the agent's pacing
    (what a hostile or broken child could do)."""
    import mitogen.core
    for i in range(n):
        mitogen.core._send(0, 102, b'flood\x0020\x00record %d' % i)
    return n
