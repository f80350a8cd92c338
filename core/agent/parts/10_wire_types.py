# ---------------------------------------------------------------------------
# Exceptions and wire classes. Their __module__ is 'mitogen.core', so pickle
# writes them as GLOBAL mitogen.core.<name>, which is what peers expect.

class Error(Exception):
    """Base of mitogen errors. ``Error(fmt, *args)`` applies ``fmt % args``."""
    def __init__(self, fmt=None, *args):
        if args:
            fmt %= args
        Exception.__init__(self, fmt)


class StreamError(Error):
    """A stream or message could not be handled (bad frame, refused type)."""


class ChannelError(Error):
    """A channel died or was closed."""


class TimeoutError(Error):
    """An operation timed out."""


def _format_exception(exc):
    """Render `exc` as CallError text:
    "<module>.<Class>: <message>\\n<traceback>"."""
    cls = type(exc)
    text = '%s.%s: %s' % (cls.__module__, cls.__name__, exc)
    tb = exc.__traceback__
    if tb is not None:
        import traceback  # ~10 ms; only paid once something actually fails
        text += '\n' + ''.join(traceback.format_tb(tb))
    if len(text) > _CALL_ERROR_MAX:
        # Keep the head (the message) and the tail (the innermost frames).
        keep = (_CALL_ERROR_MAX - 40) // 2
        text = '%s\n[... %d characters cut ...]\n%s' % (
            text[:keep], len(text) - 2 * keep, text[-keep:])
    return text


class CallError(Error):
    """A remote exception, carried as text.

    ``CallError(exc)`` captures the type, message and traceback of `exc`;
    ``CallError(text)`` wraps text received from a peer.
    """
    def __init__(self, fmt=None, *args):
        if isinstance(fmt, BaseException):
            fmt, args = _format_exception(fmt), ()
        Error.__init__(self, fmt, *args)

    def __reduce__(self):
        return (_unpickle_call_error, (self.args[0],))


def _unpickle_call_error(text):
    if type(text) is not str:
        raise TypeError('cannot unpickle CallError: bad input')
    return CallError(text)


class Kwargs(dict):
    """Keyword arguments of a call. A distinct type so that a peer can tell
    them from an ordinary dict argument."""
    __slots__ = ()   # no __dict__: a hostile BUILD opcode has nothing to set

    def __repr__(self):
        return 'Kwargs(%s)' % (dict.__repr__(self),)

    def __reduce__(self):
        return (Kwargs, (dict(self),))


class Blob(bytes):
    """Bytes that logs show as ``[blob: N bytes]`` instead of their content."""
    __slots__ = ()

    def __repr__(self):
        return '[blob: %d bytes]' % len(self)

    def __reduce__(self):
        return (Blob, (bytes(self),))


class Secret(str):
    """Text that logs show as ``[secret]`` (passwords and the like)."""
    __slots__ = ()

    def __repr__(self):
        return '[secret]'

    def __reduce__(self):
        return (Secret, (str(self),))


class Context(object):
    """A reference to a context, as carried on the wire. Calling through it
    arrives in a later issue; for now it is a value with an id and a name."""
    def __init__(self, context_id, name=None):
        self.context_id = context_id
        self.name = name

    def __reduce__(self):
        return (_unpickle_context, (self.context_id, self.name))

    def __eq__(self, other):
        return (isinstance(other, Context) and
                other.context_id == self.context_id)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash((Context, self.context_id))

    def __repr__(self):
        return 'Context(%d, %r)' % (self.context_id, self.name)


def _unpickle_context(context_id, name):
    if not (type(context_id) is int and context_id >= 0 and
            (name is None or (type(name) is str and len(name) < 100))):
        raise TypeError('cannot unpickle Context: bad input')
    return Context(context_id, name)


class Sender(object):
    """A (context, handle) pair that messages can be sent to (issue 5)."""
    def __init__(self, context, dst_handle):
        self.context = context
        self.dst_handle = dst_handle

    def __reduce__(self):
        return (_unpickle_sender, (self.context.context_id, self.dst_handle))

    def send(self, data):
        """Send `data` to the receiver: written to the parent at once, from
        the calling thread (no hand-off)."""
        data = _encode(data)
        if _inbox is not None and len(data) > _inbox.max_message_size:
            raise StreamError('message of %d bytes exceeds max_message_size',
                              len(data))
        _send(self.context.context_id, self.dst_handle, data)

    explicit_close_msg = 'Sender was explicitly closed'

    def close(self):
        """End the channel: the receiver's get() raises ChannelError."""
        _send(self.context.context_id, self.dst_handle,
              self.explicit_close_msg.encode(), reply_to=IS_DEAD)

    def __repr__(self):
        return 'Sender(%r, %r)' % (self.context, self.dst_handle)


def _unpickle_sender(context_id, dst_handle):
    if not (type(context_id) is int and context_id >= 0 and
            type(dst_handle) is int and dst_handle > 0):
        raise TypeError('cannot unpickle Sender: bad input')
    return Sender(Context(context_id), dst_handle)


class _DEAD(object):
    """The dead marker, a singleton. Pickles as GLOBAL, EMPTY_TUPLE, REDUCE."""
    __slots__ = ()   # nothing for a hostile BUILD opcode to set
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = object.__new__(cls)
        return cls._instance

    def __reduce__(self):
        return (_DEAD, ())

    def __repr__(self):
        return 'mitogen.core._DEAD'


