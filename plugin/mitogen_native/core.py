"""Values and exceptions shared by every part of mitogen_native.

The classes that may cross the wire besides the built-in types (see the
serialization rules in docs/getting-started.md) live here, under the names the
wire protocol uses for them (``mitogen.core.Kwargs``, ``CallError``, ...), plus
:class:`Context`, the handle on a running context.
"""
import logging
import threading

from mitogen_native import _native

from mitogen_native._wire import (  # the wire types, re-exported here
    Error, CallError, ChannelError, FileError, StreamError, PasswordError,
    EofError, HostKeyError, ConnectTimeoutError,
    TimeoutError, Kwargs, Blob, Secret, Sender, _DEAD, LatchError)
from mitogen_native._channels import Message, Receiver, Channel, Latch
for _cls in (Error, CallError, ChannelError, FileError, StreamError, PasswordError,
             EofError, HostKeyError, ConnectTimeoutError,
             TimeoutError, Kwargs, Blob, Secret, Sender, _DEAD, LatchError,
             Message, Receiver, Channel, Latch):
    _cls.__module__ = __name__

LOG = logging.getLogger('mitogen')

#: A running context: ``call()``, ``call_async()``, ``call_no_reply()``,
#: ``shutdown()``. Contexts may be passed to and returned from calls.
Context = _native.Context
#: What ``Context.call_async()`` returns; ``get()`` gives the result. (The
#: channel :class:`Receiver` above is a different class: its ``get()`` returns
#: a :class:`Message`, as upstream's does.)
CallReceiver = _native.Receiver
CallReceiver.__name__ = CallReceiver.__qualname__ = 'CallReceiver'
#: What ``Context.shutdown()`` returns; ``get(timeout=None)`` waits until the
#: context has exited (upstream returns a Latch for the same purpose).
ShutdownLatch = _native.ShutdownLatch
for _cls in (Context, CallReceiver, ShutdownLatch):
    _cls.__module__ = __name__
del _cls


def _context_send(self, msg):
    """Send `msg` (a :class:`Message`, e.g. ``Message.pickled(value,
    handle=h)``, or one received and passed on) to this context's
    ``msg.handle``, as upstream's Context.send(): ``dst_id`` is set to this
    context. The value is checked and encoded here, with the serialization
    rules of calls; a received message's bytes are sent as they are."""
    if not isinstance(msg, Message):
        raise TypeError('send() takes a Message, not %s' % type(msg).__name__)
    if msg.handle is None:
        raise ValueError('send(): the Message has no handle')
    msg.dst_id = self.context_id
    value = msg._value
    raw = None
    if value is Message._unset:
        raw, value = bytes(msg.data), None
    _native._send_message(self, int(msg.handle), int(msg.reply_to or 0), value, raw)


Context.send = _context_send

_native._register_types(
    Kwargs=Kwargs, Blob=Blob, Secret=Secret, CallError=CallError, Sender=Sender,
    _DEAD=_DEAD, Error=Error, ChannelError=ChannelError, StreamError=StreamError,
    TimeoutError=TimeoutError)


# ---------------------------------------------------------------------------
# Log records from contexts (and from the C++ core) reach `logging` here. The
# broker thread never runs Python: it queues records in C++, and this daemon
# thread moves them into `logging`.

def _emit(batch):
    for context_name, context_id, name, level, text in batch:
        # The core and the agents start many messages with "mitogen: ", which
        # their logger's name ('mitogen') already says.
        if text.startswith('mitogen: ') and (name == 'mitogen' or name.startswith('mitogen.')):
            text = text[len('mitogen: '):]
        if context_name is None:
            logger = logging.getLogger(name)
            if logger.isEnabledFor(level):
                logger.log(level, '%s', text)
            continue
        logger = logging.getLogger('mitogen.ctx.' + context_name)
        if logger.isEnabledFor(level):
            logger.log(level, '%s: %s', name, text, extra={
                'mitogen_name': name,
                'mitogen_message': text,
                'mitogen_context_id': context_id,
                'mitogen_context_name': context_name,
            })


class _LogPump(object):
    def __init__(self):
        self._lock = threading.Lock()
        self._thread = None

    def start(self):
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name='mitogen_native.logs')
                self._thread.start()

    def _run(self):
        while True:
            batch = _native._log_wait(1.0)
            if batch is None:
                return
            try:
                _emit(batch)
            except Exception:
                pass  # logging's own handlers report their errors; never die here

    def stop(self):
        """Deliver what is queued and stop (at exit, once the brokers are gone)."""
        _native._log_close()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(2.0)
            return
        while True:
            batch = _native._log_wait(0.0)
            if batch is None:
                return
            _emit(batch)


_log_pump = _LogPump()


def _set_core_log_level(level):
    _native._set_core_log_level(level)


_debug_handler = None


def private_tmp_dir():
    """``$TMPDIR/mitogen-<euid>`` (default ``/tmp``), where debug logs go: created
    mode 0700 if missing, refused (``PermissionError``) unless it is a real
    directory of ours that nobody else can write to, so another user can neither
    plant a file at a log's name nor read what we log. Contexts use the same
    rule on their own machine."""
    import os
    import stat
    path = os.path.join(os.environ.get('TMPDIR') or '/tmp', 'mitogen-%d' % os.geteuid())
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError('%s is not a private directory of uid %d' % (path, os.geteuid()))
    return path


def debug_log_path(pid=None):
    """Where the debug log of process `pid` (default: this one) is written."""
    import os
    return os.path.join(private_tmp_dir(), 'mitogen.%d.log' % (pid or os.getpid()))


def _open_new(path):
    """Open `path` for appending, created afresh with O_EXCL (a leftover of an
    earlier process with our pid is replaced), never through a symlink."""
    import os
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        fd = os.open(path, flags, 0o600)
    return os.fdopen(fd, 'a', buffering=1, encoding='utf-8', errors='replace')


def enable_debug_logging():
    """Write this program's mitogen_native DEBUG log to :func:`debug_log_path`
    (``$TMPDIR/mitogen-<uid>/mitogen.<pid>.log``)."""
    global _debug_handler
    if _debug_handler is None:
        _debug_handler = logging.StreamHandler(_open_new(debug_log_path()))
        _debug_handler.setFormatter(logging.Formatter(
            '%(asctime)s %(levelname).1s %(name)s: %(message)s', '%H:%M:%S'))
        logging.getLogger('mitogen').addHandler(_debug_handler)
    logging.getLogger('mitogen').setLevel(logging.DEBUG)
    _set_core_log_level(logging.DEBUG)
