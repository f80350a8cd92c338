"""Values and exceptions shared by every part of mitogen_native.

The classes that may cross the wire besides the built-in types (see the
serialization rules in docs/getting-started.md) live here, under the names the
wire protocol uses for them (``mitogen.core.Kwargs``, ``CallError``, ...), plus
:class:`Context`, the handle on a running context.
"""
import logging
import threading

from mitogen_native import _native

LOG = logging.getLogger('mitogen')


class Error(Exception):
    """Base of every mitogen_native exception. ``Error(fmt, *args)`` formats
    ``fmt % args``."""
    def __init__(self, fmt=None, *args):
        if args:
            fmt %= args
        Exception.__init__(self, fmt)


class CallError(Error):
    """A function called in a context raised.

    ``str(e)`` is the remote exception as ``"<module>.<Class>: <message>"``
    followed by the remote traceback. The parts are also available as
    :attr:`type_name` (e.g. ``'builtins.ValueError'``), :attr:`remote_message`
    and :attr:`remote_traceback`.

    ``CallError(exc)`` builds the same text from a local exception, for code
    that wants to return or send one.
    """
    def __init__(self, fmt=None, *args):
        if isinstance(fmt, BaseException):
            fmt, args = _describe_exception(fmt), ()
        Error.__init__(self, fmt, *args)

    def _parts(self):
        text = self.args[0] if self.args and isinstance(self.args[0], str) else ''
        head, _, tb = text.partition('\n')
        type_name, sep, message = head.partition(': ')
        if not sep or ' ' in type_name:
            return '', head, tb
        return type_name, message, tb

    @property
    def type_name(self):
        """Qualified name of the remote exception's class ('' if unknown)."""
        return self._parts()[0]

    @property
    def remote_message(self):
        """The remote exception's message."""
        return self._parts()[1]

    @property
    def remote_traceback(self):
        """The remote traceback, as text."""
        return self._parts()[2]


def _describe_exception(exc):
    import traceback
    cls = type(exc)
    text = '%s.%s: %s' % (cls.__module__, cls.__name__, exc)
    if exc.__traceback__ is not None:
        text += '\n' + ''.join(traceback.format_tb(exc.__traceback__))
    return text


class ChannelError(Error):
    """The other end went away: the context exited, was killed, or could not be
    reached, before answering."""


class FileError(Error, OSError):
    """A file transfer (``Context.put_file``, ``get_file``, ``copy_file``)
    failed; the destination was left as it was. An ``OSError``: ``errno`` is
    the error behind it when there is one (``ENOSPC``, ``EACCES``, ... on
    whichever side it happened), else 0; ``strerror`` is the full message."""
    def __init__(self, *args):
        OSError.__init__(self, *args)


class StreamError(Error):
    """A context could not be started, or its connection broke the protocol."""


class PasswordError(StreamError):
    """sudo, su or doas refused the password given, or asked for one and none was
    given (upstream: mitogen.sudo.PasswordError). The message says which."""


class TimeoutError(Error):
    """A wait given a timeout ran out of time. (Not the built-in TimeoutError.)"""


class Kwargs(dict):
    """Keyword arguments of a call, kept distinct from an ordinary dict argument."""
    __slots__ = ()

    def __repr__(self):
        return 'Kwargs(%s)' % (dict.__repr__(self),)


class Blob(bytes):
    """Bytes that log messages show as their size rather than their content."""
    __slots__ = ()

    def __repr__(self):
        return '[blob: %d bytes]' % len(self)


class Secret(str):
    """Text that log messages mask (passwords and the like)."""
    __slots__ = ()

    def __repr__(self):
        return '[secret]'


class Sender(object):
    """Where messages to one handle of one context go: the writing end of a
    channel (see docs/channels.md). Senders may be passed to and returned from
    calls; handing one of this program's Senders to a context is what allows
    that context to send to it."""
    def __init__(self, context, dst_handle):
        self.context = context
        self.dst_handle = dst_handle

    def send(self, data):
        """Send `data` (any serializable value) to the receiver."""
        _native._send(self.context, self.dst_handle, data)

    explicit_close_msg = 'Sender was explicitly closed'

    def close(self):
        """End the channel: the receiver's get() raises ChannelError once it
        has returned what was sent before."""
        _native._send_dead(self.context, self.dst_handle, self.explicit_close_msg)

    def __repr__(self):
        return 'Sender(%r, %r)' % (self.context, self.dst_handle)


class _DEAD(object):
    """The dead marker: what a closed channel yields. ``_DEAD()`` is a singleton."""
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = object.__new__(cls)
        return cls._instance

    def __repr__(self):
        return 'mitogen_native.core._DEAD'


class LatchError(Error):
    """The Latch was closed."""


from mitogen_native._channels import (  # noqa: E402  (needs the classes above)
    Message, Receiver, Channel, Latch, _Handlers)
for _cls in (Message, Receiver, Channel, Latch):
    _cls.__module__ = __name__

#: A running context: ``call()``, ``call_async()``, ``call_no_reply()``,
#: ``shutdown()``. Contexts may be passed to and returned from calls.
Context = _native.Context
#: What ``Context.call_async()`` returns; ``get()`` gives the result. (The
#: channel :class:`Receiver` above is a different class: its ``get()`` returns
#: a :class:`Message`, as upstream's does.)
CallReceiver = _native.Receiver
CallReceiver.__name__ = CallReceiver.__qualname__ = 'CallReceiver'
for _cls in (Context, CallReceiver):
    _cls.__module__ = __name__
del _cls

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
