"""The values and exceptions that cross the wire or the API edge, apart from
everything else: core.py re-exports them under ``mitogen_native.core`` (their
``__module__``), and _channels.py builds on them without importing core.py."""
from mitogen_native import _native


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
    """A context could not be started, or its connection broke the protocol.

    :attr:`code` names what happened, as the C++ core's error code does
    (``'auth_failed'``, ``'host_key_unknown'``, ``'child_died'``, ...; see
    docs/getting-started.md), or is None when there is no code. The subclasses
    below carry upstream Mitogen's names for the cases programs tell apart."""
    code = None


class EofError(StreamError):
    """The connection failed or closed while the context was starting: the host
    was unreachable, or the child (or the remote command) exited before it had
    booted; the message carries its stderr and exit status (upstream:
    mitogen.parent.EofError)."""


class HostKeyError(StreamError):
    """The SSH server's host key was refused: unknown to ``known_hosts`` under
    ``check_host_keys='enforce'``, or different from the recorded one
    (upstream: mitogen.ssh.HostKeyError). The message shows its fingerprint."""


class PasswordError(StreamError):
    """A password was refused, or one was needed and none was given: by sudo,
    su or doas, or by the SSH server (every credential refused) (upstream:
    mitogen.sudo.PasswordError, mitogen.ssh.PasswordError, ...). The message
    says which."""


class TimeoutError(Error):
    """A wait given a timeout ran out of time. (Not the built-in TimeoutError.)"""


class ConnectTimeoutError(StreamError, TimeoutError):
    """A context did not start within ``connect_timeout``: both a StreamError
    and a TimeoutError (upstream raises mitogen.core.TimeoutError there)."""


_STREAM_ERRORS = {
    'child_died': EofError,
    'bootstrap_failed': EofError,
    'host_unreachable': EofError,
    'host_key_mismatch': HostKeyError,
    'host_key_unknown': HostKeyError,
    'auth_failed': PasswordError,
    'become_password_wrong': PasswordError,
    'become_password_required': PasswordError,
    'connect_timeout': ConnectTimeoutError,
}


def _stream_error(code, message):
    """The exception for a failure the core reports with error code `code`."""
    e = _STREAM_ERRORS.get(code, StreamError)(message)
    e.code = code
    return e


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
