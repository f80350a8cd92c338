"""Helpers: broker lifetime and logging setup."""
import functools
import logging
import os
import sys

from mitogen_native import core
from mitogen_native import master


def _formatter():
    return logging.Formatter('%(asctime)s %(levelname).1s %(name)s: %(message)s', '%H:%M:%S')


def log_to_file(path=None, io=False, level='INFO'):
    """Send log records, including contexts' stdout and stderr, to `path` (default:
    ``sys.stderr``) at `level` and above. ``MITOGEN_LOG_LEVEL`` in the environment
    overrides `level`. Calling it again replaces the handler it installed before.
    (`io` is accepted for compatibility; there is no separate I/O log.)"""
    root = logging.getLogger('')
    level = os.environ.get('MITOGEN_LOG_LEVEL', level)
    if isinstance(level, str):
        name = level.upper()
        level = logging.DEBUG if name == 'IO' else getattr(logging, name, logging.INFO)
    stream = open(path, 'w', 1) if path else sys.stderr
    for old in list(root.handlers):
        if getattr(old, 'is_mitogen', False):
            root.removeHandler(old)
    handler = logging.StreamHandler(stream)
    handler.is_mitogen = True
    handler.setFormatter(_formatter())
    root.handlers.insert(0, handler)
    root.setLevel(level)
    core._set_core_log_level(level)


def run_with_router(func, *args, **kwargs):
    """Call ``func(router, *args, **kwargs)`` with a fresh Router on a fresh Broker,
    and shut the broker down however `func` ends. Returns `func`'s result."""
    broker = master.Broker()
    router = master.Router(broker)
    try:
        return func(router, *args, **kwargs)
    finally:
        broker.shutdown()
        broker.join()


def with_router(func):
    """Decorator form of :func:`run_with_router`: the decorated function gets the
    router as its first argument, the caller passes the rest."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return run_with_router(func, *args, **kwargs)
    return wrapper


def cast(obj):
    """`obj` with every container and string turned into the plain type the wire
    accepts, as upstream's mitogen.utils.cast: dict subclasses (``OrderedDict``,
    ``defaultdict``) become dict, list/tuple subclasses (a ``namedtuple``)
    become list, str and bytes subclasses become str and bytes, int and float
    subclasses (an ``IntEnum``) become int and float. None, bool, and the
    classes of :mod:`mitogen_native.core` that may be sent (Context, CallError,
    Kwargs, Blob, Secret, Sender, the dead marker) pass unchanged.

    :raises TypeError: a value of any other type (a set, an object...)."""
    if obj is None or type(obj) in _PASSTHROUGH:
        return obj
    if isinstance(obj, dict):
        return dict((cast(k), cast(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return [cast(v) for v in obj]
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    raise TypeError('Cannot serialize: %r: %r' % (type(obj), obj))


_PASSTHROUGH = (bool, int, float, str, bytes, core.Context, core.CallError,
                core.Kwargs, core.Blob, core.Secret, core.Sender, core._DEAD)
