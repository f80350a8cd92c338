"""mitogen-native agent: the program every child context runs.

The first stage (stage1.py) executes this file as the module ``mitogen.core``
inside a synthetic ``mitogen`` package and calls :func:`_bootstrap`, which
reads the config frame, rewires file descriptors, writes ``MITO001`` and then
serves messages on the main thread until SHUTDOWN or until the parent goes.
docs/protocol.md is the specification; this file is its Python side.

Design notes for readers:

* Latency: the main thread reads frames itself and runs calls inline. Handing
  a message from a reader thread to the main thread would cost more than the
  whole C++ round trip we aim for.
* Startup: every import here is paid on every bootstrap. ``logging`` (~15 ms),
  ``traceback``, ``threading`` and ``re`` are avoided or imported lazily; the
  agent logs through its own tiny ``_log`` function.
* Safety: only the wire types listed in protocol.md may be decoded or encoded.
  Anything else becomes an error reply, never a crash.
* Lifetime: a watcher thread notices the parent hanging up even while a call
  is running, so an agent never outlives its parent.

Compatible with Python 3.6+, standard library only.
"""

import fcntl
import io
import os
import select
import sys
import time
import zlib          # already loaded by stage 1
import _thread
from _struct import Struct   # struct.py only re-exports _struct


def _import_pickle():
    """Import the C pickler, skipping pickle.py (which imports `re`).

    _pickle imports `functools` only to keep `functools.partial`, which it
    needs solely to write objects with keyword-only __getnewargs_ex__ at
    protocol < 4: never a wire value. Importing functools costs ~4 ms
    (collections, operator, ...), a fifth of our startup budget, so a
    stand-in is registered while _pickle initialises. This runs while the
    module executes during bootstrap, before any other thread exists; if a
    Python version needs more of functools, we import it for real instead.
    """
    if 'functools' not in sys.modules:
        stand_in = type(sys)('functools')
        stand_in.partial = None
        sys.modules['functools'] = stand_in
        try:
            import _pickle
            return _pickle
        except Exception:
            pass
        finally:
            del sys.modules['functools']
    try:
        import _pickle
        return _pickle
    except ImportError:   # not CPython
        import pickle
        return pickle


_pickle_mod = _import_pickle()


# ---------------------------------------------------------------------------
# Protocol constants (docs/protocol.md).

HEADER_MAGIC = 0x4d49
BOOTSTRAP = 0
GET_MODULE = 100
CALL_FUNCTION = 101
FORWARD_LOG = 102
ADD_ROUTE = 103
DEL_ROUTE = 104
ALLOCATE_ID = 105
SHUTDOWN = 106
LOAD_MODULE = 107
IS_DEAD = 999
FIRST_DYNAMIC_HANDLE = 1000
DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024

_HEADER = Struct('>hLLLLLL')
_HEADER_LEN = _HEADER.size              # 26
_PICKLE_PROTOCOL = 3                    # BINBYTES for bytes; see protocol.md
_MAX_DEPTH = 100                        # the C++ decoder's nesting limit
_READ_SIZE = 65536
_PRIVATE_FD_MIN = 100                   # protocol fds live at or above this
_CALL_ERROR_MAX = 9999                  # upstream refuses longer CallErrors

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_LEVEL_NAMES = {DEBUG: 'DEBUG', INFO: 'INFO', WARNING: 'WARNING',
                ERROR: 'ERROR'}

# Filled in by _bootstrap() from the config frame. Upstream exposes the same
# values as attributes of the `mitogen` package, which _bootstrap() also sets.
context_id = None
parent_id = None
parent_ids = []


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


# ---------------------------------------------------------------------------
# Restricted decoding. The pickle machinery calls find_class() for every
# global a stream names; only the table in protocol.md gets through, and even
# those go through constructors that check their arguments (so that, say,
# bytearray(10**12) cannot be requested).

def _unpickle_kwargs(d):
    if type(d) is not dict:
        raise TypeError('cannot unpickle Kwargs: bad input')
    return Kwargs(d)


def _unpickle_blob(b=b''):
    if type(b) is not bytes:
        raise TypeError('cannot unpickle Blob: bad input')
    return Blob(b)


def _unpickle_secret(s=''):
    if type(s) is not str:
        raise TypeError('cannot unpickle Secret: bad input')
    return Secret(s)


def _unpickle_codecs_encode(text, encoding):
    # CPython protocol 2 spells bytes as _codecs.encode(text, 'latin1').
    if type(text) is not str or encoding not in ('latin1', 'latin-1'):
        raise TypeError('cannot unpickle bytes: bad input')
    return text.encode('latin-1')


def _unpickle_empty_bytes():
    return b''


def _unpickle_bytearray(*args):
    # bytearray() or bytearray(bytes); protocol 2 spells the bytes argument
    # with _codecs.encode, which has already been applied here.
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    raise TypeError('cannot unpickle bytearray: bad input')


_WIRE_GLOBALS = {
    ('mitogen.core', 'Kwargs'): _unpickle_kwargs,
    ('mitogen.core', 'Blob'): _unpickle_blob,
    ('mitogen.core', 'Secret'): _unpickle_secret,
    ('mitogen.core', 'CallError'): _unpickle_call_error,
    ('mitogen.core', '_unpickle_call_error'): _unpickle_call_error,
    ('mitogen.core', '_unpickle_context'): _unpickle_context,
    ('mitogen.core', '_unpickle_sender'): _unpickle_sender,
    ('mitogen.core', '_DEAD'): _DEAD,
    ('_codecs', 'encode'): _unpickle_codecs_encode,
    ('__builtin__', 'bytes'): _unpickle_empty_bytes,   # protocol 2 streams
    ('builtins', 'bytes'): _unpickle_empty_bytes,      # protocol 3 streams
    ('__builtin__', 'bytearray'): _unpickle_bytearray,
    ('builtins', 'bytearray'): _unpickle_bytearray,
}


class _Unpickler(_pickle_mod.Unpickler):
    __slots__ = ()

    def find_class(self, module, name):
        try:
            return _WIRE_GLOBALS[module, name]
        except KeyError:
            raise StreamError('refused to unpickle %s.%s: not a wire type',
                              module, name)

    def persistent_load(self, pid):
        raise StreamError('refused to unpickle a persistent id')


class _Source(object):
    """The payload as a file for the unpickler. Its first peek() hands over
    all of it, so the C unpickler decodes from memory; given an io.BytesIO
    it would call read() once per opcode (2x slower on a small call, 6x on
    a list of 1000 ints). Later calls return nothing, so a truncated pickle
    fails instead of being read twice."""
    __slots__ = ('data',)

    def __init__(self, data):
        self.data = data

    def peek(self, n):
        data, self.data = self.data, b''
        return data

    def read(self, n):
        return b''

    def readline(self):
        return b''

    def readinto(self, buf):
        return 0


def _decode(data):
    """Decode a pickled payload, allowing only wire types."""
    return _Unpickler(_Source(data)).load()


# ---------------------------------------------------------------------------
# Encoding. pickle would happily write any global (functions, user classes),
# which peers would then refuse, so values are checked before pickling. The
# check is exact on type(): subclasses (IntEnum, OrderedDict, namedtuple...)
# would pickle as their own class and are refused too.

_LEAF_TYPES = frozenset([
    type(None), bool, int, float, str, bytes, bytearray,
    Blob, Secret, CallError, Context, Sender, _DEAD,
])


def _check_items(items, depth):
    # issuperset() walks the iterable in C; only containers (or refused
    # values) fall through to the Python loop.
    if not _LEAF_TYPES.issuperset(map(type, items)):
        for item in items:
            if type(item) not in _LEAF_TYPES:
                _check_value(item, depth)


def _check_value(obj, depth=0):
    t = type(obj)
    if t in _LEAF_TYPES:
        return
    if depth >= _MAX_DEPTH:
        raise StreamError('cannot send value: nested deeper than %d levels',
                          _MAX_DEPTH)
    if t is list or t is tuple:
        _check_items(obj, depth + 1)
    elif t is dict or t is Kwargs:
        _check_items(obj.keys(), depth + 1)
        _check_items(obj.values(), depth + 1)
    else:
        raise StreamError('cannot send a %s.%s: type %r is not allowed on the '
                          'wire', t.__module__, t.__qualname__, t.__name__)


_SCALAR_TYPES = frozenset([type(None), bool, int, float, CallError, Context,
                           Sender, _DEAD])
_SIZED_TYPES = frozenset([str, bytes, bytearray, Blob, Secret])


def _encode(obj):
    """Pickle `obj` for the wire; StreamError names a refused type. Returns
    bytes or a memoryview."""
    _check_value(obj)
    t = type(obj)
    if t in _SCALAR_TYPES or (t in _SIZED_TYPES and len(obj) < 65536):
        return _pickle_mod.dumps(obj, _PICKLE_PROTOCOL)
    # dumps() copies every bytes value into a growing buffer: ~1 ms per MiB of
    # fresh pages. A Pickler writing to BytesIO hands big values over by
    # reference. Costs ~1.5 us more for small values, so scalars skip it.
    f = io.BytesIO()
    _pickle_mod.Pickler(f, _PICKLE_PROTOCOL).dump(obj)
    return f.getbuffer()


# ---------------------------------------------------------------------------
# Messages and output.

class Message(object):
    __slots__ = ('dst_id', 'src_id', 'auth_id', 'handle', 'reply_to', 'data',
                 'receiver')   # receiver: set by Select (channels section)

    def __init__(self, dst_id, src_id, auth_id, handle, reply_to, data):
        self.dst_id = dst_id
        self.src_id = src_id
        self.auth_id = auth_id
        self.handle = handle
        self.reply_to = reply_to
        self.data = data
        self.receiver = None

    @property
    def is_dead(self):
        return self.reply_to == IS_DEAD

    def unpickle(self, throw=True, throw_dead=True):
        """The value carried (see the Channels section)."""
        if self.is_dead:
            if throw_dead:
                raise ChannelError(bytes(self.data).decode('utf-8', 'replace')
                                   or 'Channel closed by remote end.')
            return _DEAD()
        obj = _decode(self.data)
        if throw and isinstance(obj, CallError):
            raise obj
        return obj

    def __repr__(self):
        return 'Message(%r->%r, auth=%r, handle=%r, reply_to=%r, %d bytes)' % (
            self.src_id, self.dst_id, self.auth_id, self.handle,
            self.reply_to, len(self.data))


_out_fd = None          # protocol fd towards the parent; None until MITO001
_write_lock = _thread.allocate_lock()   # one frame at a time, from any thread
_exiting = False        # set once the process is on its way out
_log_level = INFO
_debug_fd = None        # $TMPDIR/mitogen-<uid>/mitogen.<pid>.log when config['debug']


def _send(dst_id, handle, data, reply_to=0):
    """Write one frame to the parent (or, for a descendant started via this
    context, to the child leading there). Safe from any thread. If the parent
    is gone the write fails, and there is nothing left to do but exit."""
    if _routes:   # via= section: a descendant is reached through a child
        child = _routes.get(dst_id)
        if child is not None:
            child.send(dst_id, handle, data, reply_to)
            return
    fd = _out_fd
    if fd is None:
        return
    header = _HEADER.pack(HEADER_MAGIC, dst_id, context_id, context_id,
                          handle, reply_to, len(data))
    # While exiting, never wait long for a writer that may be stuck.
    if not _write_lock.acquire(True, 0.5 if _exiting else -1):
        os._exit(0)
    try:
        if len(data) < _READ_SIZE:
            buf = header + data
            n = os.write(fd, buf)
            if n != len(buf):
                _write_rest(fd, buf, n)
        else:
            # Large payload: avoid copying it just to prepend 26 bytes.
            n = os.writev(fd, [header, data])
            if n < _HEADER_LEN:
                _write_rest(fd, header, n)
                n = _HEADER_LEN
            _write_rest(fd, data, n - _HEADER_LEN)
    except OSError:
        os._exit(0)   # parent gone (EPIPE, ECONNRESET, ...)
    finally:
        _write_lock.release()
    if _debug_fd is not None:
        _debug_log(DEBUG, 'sent handle=%d reply_to=%d to %d (%d bytes)'
                   % (handle, reply_to, dst_id, len(data)))


def _write_rest(fd, buf, offset):
    view = memoryview(buf)[offset:]
    while view:
        view = view[os.write(fd, view):]


def _private_tmp_dir():
    """$TMPDIR/mitogen-<euid> (default /tmp): created 0700 if missing, and
    refused unless it is a real directory of ours that nobody else may
    write to, so that no other user can plant or read our logs."""
    import stat
    base = os.environ.get('TMPDIR') or '/tmp'
    path = os.path.join(base, 'mitogen-%d' % os.geteuid())
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or \
            st.st_mode & 0o077:
        raise OSError(1, '%s is not a private directory of uid %d'
                      % (path, os.geteuid()))
    return path


def _open_debug_log():
    """A fresh mitogen.<pid>.log in _private_tmp_dir(), created with O_EXCL
    (a leftover of an earlier process with our pid is replaced)."""
    path = os.path.join(_private_tmp_dir(), 'mitogen.%d.log' % os.getpid())
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND |
             os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, 0o600)


def _debug_log(level, text):
    now = time.time()
    line = '%s.%06d %s mitogen.core: %s\n' % (
        time.strftime('%H:%M:%S', time.localtime(now)),
        int(now % 1 * 1e6), _LEVEL_NAMES.get(level, level), text)
    try:
        os.write(_debug_fd, line.encode('utf-8', 'replace'))
    except OSError:
        pass


def _forward_log(name, levelno, text):
    data = ('%s\0%d\0%s' % (name, levelno, text)).encode('utf-8', 'replace')
    _send(0, FORWARD_LOG, data)
    return len(data)


class _Pacer(object):
    """What this context forwards as output and `logging` records stays within
    half the master's per-context budget (log_forwarder.hpp: 2000 records and
    8 MiB per second, bursts of 10000 and 32 MiB), so the master never drops
    what well-behaved code prints: a writer beyond it waits (the output pipe
    fills and print() blocks; a logging call sleeps) instead. A token bucket
    that may go into debt by one record."""
    RECORDS, RECORD_BURST = 1000.0, 5000.0
    BYTES, BYTE_BURST = 4.0 * 1024 * 1024, 16.0 * 1024 * 1024

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._records, self._bytes = self.RECORD_BURST, self.BYTE_BURST
        self._t = time.monotonic()

    def delay(self):
        """Seconds to wait before the next record may go (0: now)."""
        with self._lock:
            now = time.monotonic()
            dt, self._t = now - self._t, now
            self._records = min(self.RECORD_BURST, self._records + dt * self.RECORDS)
            self._bytes = min(self.BYTE_BURST, self._bytes + dt * self.BYTES)
            return max(0.0, (1.0 - self._records) / self.RECORDS,
                       -self._bytes / self.BYTES)

    def spent(self, nbytes):
        with self._lock:
            self._records -= 1
            self._bytes -= nbytes

    def forward(self, name, levelno, text):
        """Forward one record, first waiting for the budget (backpressure on
        the calling thread)."""
        wait = self.delay()
        while wait > 0:
            time.sleep(min(wait, 0.1))
            wait = self.delay()
        self.spent(_forward_log(name, levelno, text))


_pacer = _Pacer()


def _log(level, fmt, *args):
    """The agent's own logger (logger name 'mitogen'). Does not use `logging`,
    which is too slow to import on every bootstrap."""
    text = fmt % args if args else fmt
    if _debug_fd is not None:
        _debug_log(level, text)
    if _out_fd is None:
        if level >= WARNING:
            _write_boot_error(text)
    elif level >= _log_level:
        _forward_log('mitogen', level, text)


def _write_boot_error(text):
    # Before MITO001 the only channel to a human is the boot stderr (fd 2).
    try:
        os.write(2, ('mitogen: %s\n' % (text,)).encode('utf-8', 'replace'))
    except OSError:
        pass


# Refusals (docs/security.md, "Who may make a context act").

def _is_ancestor(ident):
    """True if context `ident` is us or one of our ancestors: the contexts
    whose messages carry authority over us."""
    return ident == parent_id or ident in parent_ids or ident == context_id


_complained = set()     # senders already named in a refusal warning


def _complain(sender, fmt, *args):
    """Log a refusal at WARNING, once per sender (then DEBUG only)."""
    if sender in _complained or len(_complained) >= 4096:
        if _debug_fd is not None:
            _debug_log(DEBUG, fmt % args)
        return
    _complained.add(sender)
    _log(WARNING, fmt + ' (logged once per sender)', *args)


def _refuse_foreign(msg):
    """A message to one of our reply handles from a context it was not
    asked of."""
    _inbox._refuse(msg, 'handle %d awaits a reply from another context'
                   % msg.handle)


# ---------------------------------------------------------------------------
# Inbound messages: leader/follower reading.
#
# Whichever thread needs a message becomes the reader ("leader") if nobody
# else is reading; it reads frames and delivers each one, until its own slot
# has something. Other waiters sleep on their slot's lock and are woken either
# with a message or to take over reading. So a thread that waits (the main
# thread importing a module inside a call, say) never depends on another
# thread to read for it. The main thread's slot receives CALL_FUNCTION and
# SHUTDOWN; reply handles get slots of their own; a few handles (LOAD_MODULE)
# have handlers that the reading thread runs itself. In the common case (main
# thread idle, nobody else waiting) a message costs one read() and a few
# uncontended lock operations. Once this context has children (via=), only its
# router thread reads: a child's reader thread delivers replies and dead messages
# from that child, and it can wake a waiter sleeping on its slot but not one
# blocked reading from the parent (see _start_router_thread()).

class _Slot(object):
    __slots__ = ('queue', 'wake', 'sleeping', 'peer')

    def __init__(self, peer=None):
        self.queue = []
        self.wake = _thread.allocate_lock()
        self.wake.acquire()        # held while nobody needs waking
        self.sleeping = False
        self.peer = peer           # if set: the only context that may answer


class _Inbox(object):
    def __init__(self, fd, max_message_size):
        self.max_message_size = max_message_size
        self._file = io.FileIO(fd, 'rb', closefd=False)
        self._buf = bytearray(_READ_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0            # unread bytes are _buf[_start:_end]
        self._end = 0
        self._lock = _thread.allocate_lock()   # guards everything below
        self._reading = False      # a leader exists
        self._leader = None        # its thread ident
        self._sleeping = []        # slots whose thread sleeps, oldest first
        self.main = _Slot()
        self._slots = {}           # handle -> _Slot, for replies
        self._handlers = {}        # handle -> fn(msg), run by the reader
        self._next_handle = FIRST_DYNAMIC_HANDLE
        self.router = None         # the router thread's slot: once set, the only reader

    # -- slots and handlers --------------------------------------------------

    def new_handle(self):
        """A fresh handle for replies addressed to this context."""
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
        return handle

    def open_slot(self, peer=None):
        """Allocate a reply handle and its slot. Open it *before* sending the
        request, so that the reply cannot arrive before anyone expects it.
        With `peer` (a context id), only that context's messages are
        delivered, plus dead messages from our ancestors (a router on the way
        saying the peer cannot be reached); anything else is refused."""
        slot = _Slot(peer)
        handle = self.new_handle()
        with self._lock:
            self._slots[handle] = slot
        return handle, slot

    def close_slot(self, handle):
        """Forget a reply handle; later messages to it are refused."""
        with self._lock:
            self._slots.pop(handle, None)
        _respondents.pop(handle, None)   # via= section

    def add_handler(self, handle, fn):
        """Have whichever thread is reading call fn(msg) for each message to
        `handle`. fn must be quick and must never wait for a message (nor
        import anything that is not available locally): the reader is busy
        running it."""
        with self._lock:
            self._handlers[handle] = fn

    def del_handler(self, handle):
        with self._lock:
            self._handlers.pop(handle, None)

    def deliver(self, slot, item):
        """Queue `item` (a Message, or any marker) for the thread waiting on
        `slot` and wake it. Any thread, handlers included."""
        with self._lock:
            slot.queue.append(item)
            if slot.sleeping:
                self._wake(slot)

    def is_reader(self):
        """True if the calling thread is the one reading frames right now
        (then it must not wait for a message: nobody else would read it)."""
        return self._reading and self._leader == _thread.get_ident()

    def wait(self, slot):
        """Return the next item delivered to `slot`, reading if needed."""
        while True:
            with self._lock:
                if slot.queue:
                    return slot.queue.pop(0)
                lead = not self._reading and (self.router is None or
                                              slot is self.router)
                if lead:
                    self._reading = True
                    self._leader = _thread.get_ident()
                else:
                    slot.sleeping = True
                    self._sleeping.append(slot)
            if not lead:
                slot.wake.acquire()
                continue
            try:
                # Appends happen under the lock, but reading the list's length
                # without it is safe; the loop above re-checks with the lock.
                while not slot.queue:
                    self._route(self.read_frame())
            finally:
                self._step_down()

    def _step_down(self):
        # Hand the reader role to a sleeping waiter, if any; once there is a
        # router thread, to it alone (the others never read any more).
        with self._lock:
            self._reading = False
            self._leader = None
            router = self.router
            if router is not None:
                if router.sleeping:
                    self._wake(router)
            elif self._sleeping:
                self._wake(self._sleeping[0])

    def _wake(self, slot):
        # Called with self._lock held.
        slot.sleeping = False
        self._sleeping.remove(slot)
        slot.wake.release()

    def _route(self, msg):
        """Deliver `msg` to its slot or handler, or refuse it."""
        if msg.dst_id != context_id:
            return _route_away(msg)   # via= section
        handle = msg.handle
        if handle == CALL_FUNCTION or handle == SHUTDOWN:
            # These make us act: only our ancestors may (docs/security.md).
            auth = msg.auth_id
            if auth != parent_id and auth not in parent_ids and \
                    auth != context_id:
                return self._refuse(msg, 'context %d is not an ancestor of '
                                    'context %d: handle %d refused'
                                    % (auth, context_id, handle))
        with self._lock:
            if handle == CALL_FUNCTION or handle == SHUTDOWN:
                slot = self.main
            else:
                slot = self._slots.get(handle)
            if slot is None:
                fn = self._handlers.get(handle)
            elif slot.peer is not None and msg.src_id != slot.peer and not (
                    msg.is_dead and _is_ancestor(msg.auth_id)):
                fn = _refuse_foreign
            else:
                slot.queue.append(msg)
                if slot.sleeping:
                    self._wake(slot)
                return
        if fn is None:
            return self._refuse(msg, 'no handler for handle %d' % handle)
        try:
            fn(msg)
        except Exception as e:   # a handler bug must not kill the reader
            _log(ERROR, 'handler for handle %d failed: %s', handle,
                 _format_exception(e))

    def _refuse(self, msg, reason):
        """Drop `msg`: a dead reply if it asked for one; logged once per
        sender (a hostile neighbour must not flood our log)."""
        if msg.is_dead:
            if _debug_fd is not None:
                _debug_log(DEBUG, 'dropped dead %r: %s' % (msg, reason))
            return
        if msg.reply_to:
            _send(msg.src_id, msg.reply_to, reason.encode('utf-8'),
                  reply_to=IS_DEAD)
        _complain(msg.src_id, 'dropped %r: %s', msg, reason)


    # -- framing -------------------------------------------------------------

    def _fill(self, n):
        """Ensure at least `n` (<= buffer size) unread bytes are buffered."""
        if self._start + n > len(self._buf):
            avail = self._end - self._start
            self._view[:avail] = bytes(self._view[self._start:self._end])
            self._start, self._end = 0, avail
        while self._end - self._start < n:
            got = self._file.readinto(self._view[self._end:])
            if not got:
                _exit_on_eof()
            self._end += got

    def read_frame(self):
        """Read one frame. Never returns on EOF or a framing error: the
        process exits, because the parent is gone or framing is lost."""
        if self._end - self._start < _HEADER_LEN:
            self._fill(_HEADER_LEN)
        (magic, dst_id, src_id, auth_id, handle, reply_to,
         length) = _HEADER.unpack_from(self._buf, self._start)
        if magic != HEADER_MAGIC:
            _log(ERROR, 'bad frame magic 0x%04x: framing lost, exiting',
                 magic & 0xffff)
            _exit(1)
        if length > self.max_message_size:
            _log(ERROR, 'frame of %d bytes exceeds max_message_size %d: '
                 'exiting', length, self.max_message_size)
            _exit(1)
        self._start += _HEADER_LEN
        if length <= len(self._buf):
            if self._end - self._start < length:
                self._fill(length)
            data = bytes(self._view[self._start:self._start + length])
            self._start += length
        else:
            # Large payload: read straight into a buffer of exactly `length`.
            data = bytearray(length)
            view = memoryview(data)
            got = self._end - self._start
            view[:got] = self._view[self._start:self._end]
            self._start = self._end = 0
            while got < length:
                n = self._file.readinto(view[got:])
                if not n:
                    _exit_on_eof()
                got += n
        msg = Message(dst_id, src_id, auth_id, handle, reply_to, data)
        if _debug_fd is not None:
            _debug_log(DEBUG, 'received %r' % (msg,))
        return msg


_inbox = None


# ---------------------------------------------------------------------------
# Importing modules from the parent (GET_MODULE / LOAD_MODULE, protocol.md).
#
# The finder sits at the end of sys.meta_path, so it is asked only after the
# normal machinery failed: standard library and locally installed modules are
# never fetched. It asks the parent with GET_MODULE and waits for LOAD_MODULE
# through the inbox, so the waiting thread reads frames itself if nobody else
# does (the main thread importing inside a call cannot deadlock). Answers,
# negative ones included, are cached for the life of the process, as they
# arrive: the parent pushes a module's related modules before the module
# itself, and those are served from the cache without another round trip.
#
# The cache keeps each answer's payload exactly as received, so that a future
# intermediary (via=) can answer its children's GET_MODULE from it without
# re-encoding: see _Importer.request() and cached().

# Names never worth a round trip: Python 2 or Windows-only modules that stdlib
# code probes for inside try/except ImportError. Matched on the top-level
# name only (upstream's list matches prefixes, which hides 'orgparse' too).
_NEVER_FETCH = frozenset([
    '__builtin__', 'cStringIO', 'thread', 'org', 'java', 'msvcrt', 'nt',
    '_winapi', '_winreg', 'winreg', '_overlapped', '_msi', 'winsound',
])


def _is_str_list(value):
    return (type(value) in (list, tuple) and
            all(type(item) is str for item in value))


def _check_module_tuple(tup):
    """Validate a LOAD_MODULE payload:
    (fullname, pkg_present, path, compressed, related)."""
    if not (type(tup) is tuple and len(tup) == 5 and type(tup[0]) is str):
        raise StreamError('bad LOAD_MODULE payload: expected a 5-tuple '
                          'starting with the module name')
    name, present, path, compressed, related = tup
    if not ((present is None or _is_str_list(present)) and
            (path is None or type(path) is str) and
            (compressed is None or isinstance(compressed, bytes)) and
            _is_str_list(related) and
            ((path is None) == (compressed is None))):
        raise StreamError('bad LOAD_MODULE payload for %r: wrong field types',
                          name)


def _negative(fullname):
    return (fullname, None, None, None, ())


class _Importer(object):
    """A sys.meta_path finder and loader for modules served by the parent."""

    def __init__(self, inbox, whitelist=(), blacklist=()):
        self._inbox = inbox
        self._lock = _thread.allocate_lock()   # guards _cache and _pending
        self._cache = {}      # fullname -> (tuple, payload bytes or None)
        self._pending = {}    # fullname -> (reply handle, [callbacks])
        self._present = {}    # package we loaded -> its submodule names
        # Upstream semantics: prefixes of the dotted name; an empty whitelist
        # allows everything.
        self.whitelist = list(whitelist) or ['']
        self.blacklist = list(blacklist)
        inbox.add_handler(LOAD_MODULE, self._on_load_module)

    def __repr__(self):
        return 'mitogen.core._Importer'

    # -- cache and requests (any thread) --------------------------------------

    def cached(self, fullname):
        """(tuple, payload) for `fullname` if it is cached, else None. The
        payload is the LOAD_MODULE message data as received (None for an
        answer synthesised here), ready to forward to a child as is."""
        return self._cache.get(fullname)

    def request(self, fullname, callback):
        """Make sure `fullname` gets cached, then call callback(). The
        callback runs at once if it already is, else in the reading thread
        when the answer arrives, so it must be quick and never wait. Only one
        GET_MODULE per name is ever in flight."""
        with self._lock:
            if fullname in self._cache:
                send = None
            else:
                pending = self._pending.get(fullname)
                if pending is not None:
                    pending[1].append(callback)
                    return
                send = self._inbox.new_handle()
                self._pending[fullname] = (send, [callback])
                # A dead message on this handle means nobody up there serves
                # modules (a master without a responder): a negative answer.
                self._inbox.add_handler(
                    send, lambda msg: self._on_reply(fullname, msg))
        if send is None:
            callback()
            return
        if _debug_fd is not None:
            _debug_log(DEBUG, 'requesting module %s' % (fullname,))
        # reply_to is ours, not upstream's: upstream masters ignore it and
        # answer on LOAD_MODULE; a router with no GET_MODULE handler answers
        # it with a dead message, so a missing responder cannot hang us.
        _send(parent_id, GET_MODULE, fullname.encode('utf-8'), reply_to=send)

    def get(self, fullname):
        """The answer for `fullname`, asking the parent if needed (blocks)."""
        entry = self._cache.get(fullname)
        if entry is not None:
            return entry[0]
        if self._inbox.is_reader():
            # Only a message handler could get here (it runs on the reading
            # thread); waiting would wait for ourselves.
            raise ImportError('cannot fetch %r from inside a message handler'
                              % (fullname,))
        slot = _Slot()
        self.request(fullname, lambda: self._inbox.deliver(slot, None))
        self._inbox.wait(slot)
        return self._cache[fullname][0]

    def _store(self, tup, payload):
        fullname = tup[0]
        with self._lock:
            self._cache[fullname] = (tup, payload)
            pending = self._pending.pop(fullname, None)
        if pending is not None:
            self._inbox.del_handler(pending[0])
            for callback in pending[1]:
                callback()

    # -- handlers (the reading thread) ----------------------------------------

    def _on_load_module(self, msg):
        if msg.is_dead:
            return
        if not _is_ancestor(msg.auth_id):
            _complain(msg.src_id, 'dropped LOAD_MODULE from context %d: not '
                      'an ancestor', msg.auth_id)
            return
        tup = None
        try:
            tup = _decode(msg.data)
            _check_module_tuple(tup)
        except Exception as e:
            _log(ERROR, 'refused LOAD_MODULE: %s', e)
            if type(tup) is tuple and tup and type(tup[0]) is str:
                self._store(_negative(tup[0]), None)   # release its waiters
            return
        if _debug_fd is not None:
            _debug_log(DEBUG, 'received module %s (%s)' % (
                tup[0], 'absent' if tup[2] is None else tup[2]))
        self._store(tup, msg.data)

    def _on_reply(self, fullname, msg):
        if not _is_ancestor(msg.auth_id):
            return _inbox._refuse(msg, 'handle %d awaits a reply from '
                                  'another context' % msg.handle)
        if msg.is_dead:
            _log(DEBUG, 'GET_MODULE %s refused: %s', fullname,
                 msg.data.decode('utf-8', 'replace'))
            self._store(_negative(fullname), None)

    # -- finder and loader (importlib) ---------------------------------------

    def _refused(self, fullname):
        top = fullname.partition('.')[0]
        return (top in _NEVER_FETCH or
                not any(fullname.startswith(s) for s in self.whitelist) or
                any(fullname.startswith(s) for s in self.blacklist))

    def find_spec(self, fullname, path=None, target=None):
        pkgname, _, leaf = fullname.rpartition('.')
        if pkgname:
            # Only submodules of packages we loaded, and only those the
            # parent listed: anything else is answered without a round trip.
            if leaf not in self._present.get(pkgname, ()):
                return None
            pkg = sys.modules.get(pkgname)
            if getattr(getattr(pkg, '__spec__', None), 'loader',
                       None) is not self:
                return None
        if self._refused(fullname):
            return None
        tup = self.get(fullname)
        if tup[2] is None:
            return None   # importlib raises ModuleNotFoundError as usual
        spec = _module_spec()(fullname, self, origin='master:' + tup[2],
                              is_package=tup[1] is not None)
        if tup[1] is not None:
            self._present[fullname] = tup[1]
        return spec

    def create_module(self, spec):
        return None   # the default module object

    def exec_module(self, module):
        spec = module.__spec__
        source = zlib.decompress(self._cache[spec.name][0][3])
        module.__file__ = spec.origin
        exec(compile(source, spec.origin, 'exec', 0, True), module.__dict__)

    def is_package(self, fullname):
        entry = self._cache.get(fullname)
        return entry is not None and entry[0][1] is not None

    def get_source(self, fullname):
        """Source text, so that linecache shows it in tracebacks."""
        entry = self._cache.get(fullname)
        if entry is None or entry[0][3] is None:
            raise ImportError('no source for %r' % (fullname,))
        return zlib.decompress(entry[0][3]).decode('utf-8', 'replace')

    def import_main(self):
        """Load the master's main script as __main__ and return it.

        As upstream: the master serves its script under the name __main__,
        cut just before its `if __name__ == '__main__':` block, so that the
        script's functions exist here while its main program does not run.
        The module replaces the bootstrap's own __main__ in sys.modules.
        """
        spec = self.find_spec('__main__')
        if spec is None:
            raise ModuleNotFoundError("No module named '__main__': the "
                                      'master serves no main script',
                                      name='__main__')
        module = _bootstrap_module().module_from_spec(spec)
        sys.modules['__main__'] = module
        try:
            self.exec_module(module)
        except BaseException:
            sys.modules['__main__'] = _stage1_main
            raise
        return module


def _bootstrap_module():
    # importlib's core is always loaded in CPython, as _frozen_importlib;
    # importing importlib.machinery would cost a few milliseconds more.
    try:
        import _frozen_importlib
        return _frozen_importlib
    except ImportError:
        import importlib._bootstrap
        return importlib._bootstrap


def _module_spec():
    return _bootstrap_module().ModuleSpec


_importer = None
_stage1_main = None   # the `python -c` module, until __main__ is fetched


# ---------------------------------------------------------------------------
# Calls.

class Dispatcher(object):
    """State of call dispatching; named as upstream's, so that a master can
    call ``mitogen.core.Dispatcher.forget_chain`` remotely.

    Calls sharing a `chain_id` form a pipeline: once one fails, the later ones
    fail with the same error without running, so a caller can fire several
    call_no_reply()s and learn of the first failure from a final call().
    """
    _chain_errors = {}   # chain_id -> CallError

    @classmethod
    def forget_chain(cls, chain_id):
        """Forget a chain's error (upstream calls this remotely)."""
        cls._chain_errors.pop(chain_id, None)


def _resolve(module, class_name, function):
    mod = sys.modules.get(module)
    if mod is None or mod is _stage1_main:
        if module == '__main__':   # the master's script, fetched once
            mod = _importer.import_main()
        else:
            __import__(module)
            mod = sys.modules[module]
    obj = getattr(mod, class_name) if class_name else mod
    return getattr(obj, function)


def _parse_call(data):
    call = _decode(data)
    if not (type(call) is tuple and len(call) == 6):
        raise StreamError('bad CALL_FUNCTION payload: expected a 6-tuple')
    chain_id, module, class_name, function, args, kwargs = call
    if not (type(module) is str and type(function) is str and
            (class_name is None or type(class_name) is str) and
            type(args) in (tuple, list) and isinstance(kwargs, dict)):
        raise StreamError('bad CALL_FUNCTION payload: wrong field types')
    return chain_id, module, class_name, function, args, kwargs


def _run_call(msg):
    """Run one CALL_FUNCTION message and send the reply, if one is wanted."""
    call = error = None
    try:
        call = _parse_call(msg.data)
        chain_id, module, class_name, function, args, kwargs = call
        if chain_id is not None:
            error = Dispatcher._chain_errors.get(chain_id)
        if error is None:
            result = _resolve(module, class_name, function)(*args, **kwargs)
            data = _encode(result)
            if len(data) > _inbox.max_message_size:
                raise StreamError('reply of %d bytes exceeds '
                                  'max_message_size', len(data))
        elif not msg.reply_to:
            return   # skipped: its chain already failed and was reported
    except BaseException as e:
        # BaseException: a stray sys.exit() in user code must become an error
        # reply, not end the context behind the caller's back.
        error = CallError(e)
        if call is not None and call[0] is not None:
            Dispatcher._chain_errors[call[0]] = error
        if not msg.reply_to:
            what = '.'.join(filter(None, call[1:4])) if call else '?'
            _log(ERROR, 'call_no_reply %s() failed: %s', what, error.args[0])
            return
    if error is not None:
        data = _encode(error)
    if msg.reply_to:
        _send(msg.src_id, msg.reply_to, data)


def _serve():
    main = _inbox.main
    while True:
        msg = _inbox.wait(main)
        if msg.is_dead:
            continue
        if msg.handle == CALL_FUNCTION:
            _run_call(msg)
        elif msg.handle == SHUTDOWN:
            if _debug_fd is not None:
                _debug_log(INFO, 'SHUTDOWN received')
            _shutdown()


def _shutdown():
    """Clean exit after SHUTDOWN: run atexit handlers, flush every output
    line, exit 0. os._exit() so that stray user threads cannot keep us."""
    try:
        import atexit
        atexit._run_exitfuncs()
        logging = sys.modules.get('logging')
        if logging is not None:
            logging.shutdown()
    except BaseException:
        pass
    _exit(0)


# ---------------------------------------------------------------------------
# File transfer (docs/files.md; the master's side is
# core/src/services/file_service.cpp). The master calls _file_receive() to
# push a file here and _file_send() to pull one; either runs on the main
# thread for the whole transfer and streams raw chunks on a reply handle of
# its own, with credit-based flow control: the receiver acknowledges the
# bytes it has written (an 8-byte big-endian count), and the sender keeps at
# most `window` bytes unacknowledged. A received file is written to a
# temporary name in the destination directory and renamed into place only
# once complete; on any failure the temporary file is removed and the
# destination is left as it was.

_FILE_ACK = Struct('>Q')          # bytes written so far
_FILE_HEADER = Struct('>QL')      # size, st_mode & 0o7777 (first message of a fetch)
_file_temps = set()               # temporary files to remove if we exit now


def _file_cleanup():
    """Remove unfinished temporary files (the process is exiting)."""
    for path in list(_file_temps):
        try:
            os.unlink(path)
        except OSError:
            pass
    _file_temps.clear()


_file_pipes_grown = False


def _file_grow_pipes():
    """Once: enlarge the protocol pipes (if they are pipes) to 1 MiB, the
    unprivileged maximum, so a chunk moves in a few system calls instead of
    sixteen 64 KiB wake-ups. Best effort."""
    global _file_pipes_grown
    if _file_pipes_grown:
        return
    _file_pipes_grown = True
    for fd in (_inbox._file.fileno(), _out_fd):
        try:
            fcntl.fcntl(fd, 1031, 1 << 20)     # F_SETPIPE_SZ
        except (OSError, TypeError):
            pass


def _file_check_sender(obj, what):
    if not (isinstance(obj, Sender) and type(obj.dst_handle) is int and
            obj.dst_handle >= FIRST_DYNAMIC_HANDLE):
        raise StreamError('bad %s: %r' % (what, obj))
    return obj.context.context_id, obj.dst_handle


def _file_id(value, kind):
    """A uid or gid from a name or a number; -1 for None (leave as is)."""
    if value is None:
        return -1
    if type(value) is int:
        return value
    if type(value) is str:
        if value.isdigit():
            return int(value)
        try:
            if kind == 'user':
                import pwd
                return pwd.getpwnam(value).pw_uid
            import grp
            return grp.getgrnam(value).gr_gid
        except KeyError:
            pass
    # An OSError with its errno: the controller's FileError carries it (EINVAL).
    raise OSError(22, 'unknown %s %r' % (kind, value))


def _file_temp(path):
    """Create a new, empty temporary file next to `path`, mode 0600."""
    directory, name = os.path.split(path)
    if not name:
        raise IsADirectoryError(21, 'Is a directory', path)
    for _ in range(100):
        tmp = os.path.join(directory, '.%s.%s.tmp' % (
            name[:200], os.urandom(6).hex()))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                         os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        _file_temps.add(tmp)
        return fd, tmp
    raise FileExistsError(17, 'no free temporary name', path)


def _file_write(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _file_receive(path, size, mode, owner, group, ack_to, ack_bytes):
    """Receive `size` bytes from the master into `path` (see the top of this
    section). Returns the number of bytes written."""
    if not (type(path) is str and path and type(size) is int and size >= 0
            and type(mode) is int and 0 <= mode <= 0o7777 and
            type(ack_bytes) is int and ack_bytes > 0):
        raise StreamError('bad _file_receive arguments')
    peer, ack_handle = _file_check_sender(ack_to, 'ack_to')
    _file_grow_pipes()
    uid, gid = _file_id(owner, 'user'), _file_id(group, 'group')
    handle, slot = _inbox.open_slot(peer)
    fd = tmp = None
    done = announced = peer_gone = False
    try:
        try:
            fd, tmp = _file_temp(path)
            # Our data handle travels as reply_to of the first acknowledgement.
            _send(peer, ack_handle, _FILE_ACK.pack(0), reply_to=handle)
            announced = True
            got = acked = 0
            while got < size:
                msg = _inbox.wait(slot)
                if msg.is_dead:
                    peer_gone = True
                    raise ChannelError('the sender gave up: %s' % (
                        msg.data.decode('utf-8', 'replace') or 'no reason'))
                if msg.src_id != peer:
                    continue
                n = len(msg.data)
                if not n or got + n > size:
                    raise StreamError('received %d bytes more than the %d '
                                      'announced' % (got + n - size, size))
                _file_write(fd, msg.data)
                got += n
                if got - acked >= ack_bytes and got < size:
                    _send(peer, ack_handle, _FILE_ACK.pack(got))
                    acked = got
            os.fsync(fd)
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)     # after chown, which may clear set-id bits
            os.close(fd)
            fd = None
            os.rename(tmp, path)
            _file_temps.discard(tmp)
            tmp = None
            dfd = os.open(os.path.dirname(path) or '.',
                          os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            done = True
            return got
        except OSError as e:
            # Name the destination, whatever file the kernel complained about.
            raise type(e)(e.errno, e.strerror or str(e), path)
    finally:
        if announced and not done and not peer_gone:
            # Swallow chunks still in flight until the master's dead message
            # says it stopped; the handler goes before the slot, so nothing
            # falls between them and gets refused noisily.
            _inbox.add_handler(handle, lambda msg: msg.is_dead and
                               _inbox.del_handler(handle))
        _inbox.close_slot(handle)
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            _file_temps.discard(tmp)


def _file_wait_ack(slot, peer, acked):
    """Wait for the master's next acknowledgement; the new acked count."""
    msg = _inbox.wait(slot)
    if msg.is_dead:
        raise ChannelError('the receiver gave up: %s' % (
            msg.data.decode('utf-8', 'replace') or 'no reason'))
    if msg.src_id == peer and len(msg.data) == _FILE_ACK.size:
        acked = max(acked, _FILE_ACK.unpack(msg.data)[0])
    return acked


def _file_send(path, data_to, chunk_size, window):
    """Stream the file at `path` to the master (see the top of this section):
    a header message, then chunks of at most `chunk_size` bytes, never more
    than `window` bytes unacknowledged. Returns the number of bytes sent."""
    if not (type(path) is str and path and type(chunk_size) is int and
            0 < chunk_size <= _inbox.max_message_size and
            type(window) is int and window >= chunk_size):
        raise StreamError('bad _file_send arguments')
    peer, data_handle = _file_check_sender(data_to, 'data_to')
    _file_grow_pipes()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise type(e)(e.errno, e.strerror or str(e), path)
    handle, slot = _inbox.open_slot(peer)
    try:
        st = os.fstat(fd)
        if not _file_is_regular(st.st_mode):
            raise OSError(22, 'not a regular file', path)
        size = st.st_size
        _send(peer, data_handle, _FILE_HEADER.pack(size, st.st_mode & 0o7777),
              reply_to=handle)
        buf = bytearray(min(chunk_size, max(size, 1)))
        view = memoryview(buf)
        sent = acked = 0
        while sent < size:
            n = min(len(buf), size - sent)
            while sent + n - acked > window:
                acked = _file_wait_ack(slot, peer, acked)
            try:
                n = os.preadv(fd, [view[:n]], sent)
            except OSError as e:
                raise type(e)(e.errno, e.strerror or str(e), path)
            if not n:
                raise OSError(5, 'file shrank while being sent', path)
            _send(peer, data_handle, view[:n])
            sent += n
        # The master acknowledges the last byte once it is written; waiting
        # for that also means no acknowledgement arrives after we are gone.
        while acked < size:
            acked = _file_wait_ack(slot, peer, acked)
        return sent
    finally:
        _inbox.close_slot(handle)
        os.close(fd)


def _file_is_regular(mode):
    return mode & 0o170000 == 0o100000


# ---------------------------------------------------------------------------
# Output forwarding and the parent watcher (one background thread).

_fwd_lock = _thread.allocate_lock()   # serialises reads of the output pipes
_pipes = {}                           # read fd -> [logger name, partial line]


def _pump(fd):
    """Forward the complete lines fd has ready, as one record (the lines
    separated by newlines): consecutive lines cost the master one record, not
    one each. Returns True if data was read, None if none was ready, False at
    EOF (the partial line is then forwarded too), or the seconds to wait
    before reading again when this context is over its output budget
    (_Pacer): nothing is read meanwhile, so the writer blocks on the full pipe
    rather than its output being dropped."""
    name_partial = _pipes[fd]
    wait = _pacer.delay()
    if wait > 0:
        return wait
    try:
        chunk = os.read(fd, _READ_SIZE)
    except BlockingIOError:
        return None
    if not chunk:
        if name_partial[1]:
            _pacer.spent(_forward_log(name_partial[0], INFO,
                                      name_partial[1].decode('utf-8', 'replace')))
            name_partial[1] = b''
        return False
    text, newline, partial = (name_partial[1] + chunk).rpartition(b'\n')
    name_partial[1] = partial
    if len(partial) >= _READ_SIZE:   # no newline in sight: send it
        text = text + b'\n' + partial if newline else partial
        name_partial[1] = b''
    elif not newline:
        return True   # no complete line yet
    _pacer.spent(_forward_log(name_partial[0], INFO, text.decode('utf-8', 'replace')))
    return True


def _flush_output():
    """Forward everything already written to fds 1 and 2, partial lines too."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if not _fwd_lock.acquire(True, 0.5):
        return
    try:
        for fd, name_partial in _pipes.items():
            while True:
                got = _pump(fd)
                if got is True:
                    continue
                if not got:
                    break
                time.sleep(min(got, 0.1))   # over budget: wait, lose nothing
            if name_partial[1]:
                _pacer.forward(name_partial[0], INFO,
                               name_partial[1].decode('utf-8', 'replace'))
                name_partial[1] = b''
    finally:
        _fwd_lock.release()


def _exit_on_eof():
    if _out_fd is None:   # still bootstrapping: that is a failure
        _exit(1, 'stdin closed before the BOOTSTRAP frame was complete')
    _exit(0, 'parent closed the connection')


def _exit(status, reason=None):
    """Leave now, forwarding pending output first if the parent can take it."""
    global _exiting
    if not _exiting:
        _exiting = True
        if reason and _debug_fd is not None:
            _debug_log(INFO, 'exiting: %s' % reason)
        if reason and status and _out_fd is None:
            _write_boot_error(reason)
        _file_cleanup()    # unfinished received files (file transfer)
        try:
            _flush_output()
        except BaseException:
            pass
    os._exit(status)


def _watch(in_fd):
    """Background thread: forward fds 1/2 line by line, and exit the moment
    the parent hangs up, whatever the main thread is doing."""
    try:
        poller = select.poll()
        # Event mask 0: poll() still reports POLLHUP/POLLERR/POLLNVAL, which
        # is all we want to know about the inbound protocol descriptor.
        poller.register(in_fd, 0)
        for fd in _pipes:
            poller.register(fd, select.POLLIN)
        # While over the output budget, only the parent is watched.
        parent_only = select.poll()
        parent_only.register(in_fd, 0)
        wait = 0
        while True:
            if wait > 0:
                events = parent_only.poll(min(wait, 0.1) * 1000)
                wait = 0
            else:
                events = poller.poll()
            for fd, event in events:
                if fd == in_fd:
                    if _out_fd is not None:
                        # Don't let a dead parent's full pipe block the exit.
                        try:
                            os.set_blocking(_out_fd, False)
                        except OSError:
                            pass
                    _exit(0, 'parent hung up')
                with _fwd_lock:
                    got = _pump(fd)
                if got is False:
                    poller.unregister(fd)
                elif isinstance(got, float):
                    wait = got
    except BaseException as e:
        _log(ERROR, 'watcher thread failed: %r', e)
        _exit(1)


# ---------------------------------------------------------------------------
# Forwarding `logging` records. `logging` costs ~15 ms to import, so the agent
# never imports it; it installs the handler at bootstrap if `logging` is
# already loaded, and otherwise from an import hook that fires right after
# user code first imports it.

_emitting = set()   # thread ids inside emit(), to stop recursion


def _install_log_handler(logging):
    """Make the root logger forward records at or above our log level."""
    class ForwardHandler(logging.Handler):
        """Sends each record to the master as FORWARD_LOG."""
        def emit(self, record):
            ident = _thread.get_ident()
            if ident in _emitting:   # something inside emit() logged
                return
            _emitting.add(ident)
            try:
                _pacer.forward(record.name, record.levelno, self.format(record))
            except Exception:
                pass   # never report via logging or stderr: it would loop
            finally:
                _emitting.discard(ident)

    root = logging.getLogger()
    root.addHandler(ForwardHandler(_log_level))
    root.setLevel(_log_level)


class _LoggingImportHook(object):
    """sys.meta_path finder that only reacts to 'logging': it asks the other
    finders for the real spec and wraps its loader, so that the handler is
    installed as soon as the module has executed. It removes itself then."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'logging':
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, 'find_spec', None)
            spec = (finder is not self and find_spec and
                    find_spec(fullname, path, target))
            if spec:
                break
        else:
            return None
        if hasattr(spec.loader, 'exec_module'):
            spec.loader = _LoggingLoader(spec.loader, self)
        return spec


class _LoggingLoader(object):
    def __init__(self, real, hook):
        self.real = real
        self.hook = hook

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        # Put the real loader back so linecache, reload() etc. see it.
        module.__loader__ = module.__spec__.loader = self.real
        self.real.exec_module(module)
        try:
            sys.meta_path.remove(self.hook)
        except ValueError:
            pass
        try:
            _install_log_handler(module)
        except Exception as e:   # never break the user's import
            _log(WARNING, 'could not install the log forwarder: %r', e)


# ---------------------------------------------------------------------------
# Contexts started by this one (via=; docs/via.md).
#
# The master calls _proxy_connect(method, options, context_id) here; this
# context then spawns the child with the method's entry in _METHODS, runs the
# same bootstrap the master runs (stage 1, the compressed agent we were sent
# ourselves, the BOOTSTRAP frame), reports the new route upward (ADD_ROUTE)
# and from then on forwards frames both ways:
#
# * parent -> descendant: _Inbox._route() hands frames not addressed to us to
#   _route_away(), which writes them to the child stream leading there. Once
#   this context has a child, a router thread keeps reading from the parent
#   even while the main thread runs a call (see _start_router_thread()).
# * child -> anyone: one reader thread per child (_child_reader) checks that
#   src_id and auth_id belong to that child's subtree, handles ADD_ROUTE,
#   DEL_ROUTE and GET_MODULE addressed to us, delivers our other messages
#   locally, and forwards the rest down (another of our subtrees) or up.
#
# Intermediaries are not the hot path: forwarding costs a thread hop, and a
# context that never starts children runs none of this code. Most of it is
# even kept as source text (_VIA_SOURCE) and compiled on the first
# _proxy_connect(): compiling it at every bootstrap would cost every context
# a few milliseconds of startup for a feature few of them use.

_routes = {}          # descendant context id -> _Child whose stream leads there
_respondents = {}     # our reply handle -> the descendant it waits on


def _expect_reply(handle, respondent):
    """Have the slot of reply handle `handle` (see _Inbox.open_slot) get a
    dead message if `respondent`, a context reached through one of our
    children, goes away before close_slot(handle) -- or at once if it is
    already gone (it may die before the waiter gets this far)."""
    with _route_lock:
        _respondents[handle] = respondent
        routed = respondent in _routes
    if not routed:
        _fail_waiters([respondent], 'context %d disconnected (or was never '
                      'connected)' %
                      (respondent,))


def _forward_up(msg):
    """Write `msg` to the parent unchanged (its src_id/auth_id are a
    descendant's, already verified by _on_child_message)."""
    frame = _HEADER.pack(HEADER_MAGIC, msg.dst_id, msg.src_id, msg.auth_id,
                         msg.handle, msg.reply_to, len(msg.data)) + msg.data
    if not _write_lock.acquire(True, 0.5 if _exiting else -1):
        os._exit(0)
    try:
        _write_rest(_out_fd, frame, 0)
    except OSError:
        os._exit(0)   # parent gone
    finally:
        _write_lock.release()


def _route_away(msg):
    """A message from the parent for another context: pass it down, or
    answer it with a dead message if no child leads there."""
    child = _routes.get(msg.dst_id)
    if child is None or not child.forward(msg):
        _inbox._refuse(msg, 'no route to context %d' % msg.dst_id)


def _proxy_connect(method, options, context_id=None, name=None):
    """Start a child context with connection method `method` (a key of
    _METHODS) and route for it. Called by the master (via=; docs/via.md).

    :param options: dict: the method's options plus python_path,
        remote_name, connect_timeout (seconds), debug, log_level,
        max_message_size.
    :param context_id: the new context's id, allocated by the master; None
        to take one from an ALLOCATE_ID block.
    :returns: upstream's reply shape, a dict: ``id`` and ``name`` of the new
        context and ``msg`` None; or ``id`` None and ``msg`` the error text
        (``code`` then names the failure: spawn_failed, connect_timeout,
        child_died).
    """
    _load_via()
    return globals()['_connect_child'](method, options, context_id, name)


_via_lock = _thread.allocate_lock()


def _load_via():
    """Compile the intermediary's code into this module, once."""
    with _via_lock:
        if '_connect_child' not in globals():
            name = '<mitogen.core via>'
            import linecache   # so that tracebacks show this code
            linecache.cache[name] = (len(_VIA_SOURCE), None,
                                     _VIA_SOURCE.splitlines(True), name)
            exec(compile(_VIA_SOURCE, name, 'exec'), globals())


# The rest of the intermediary, compiled by _load_via().
_VIA_SOURCE = r'''
# stage1.py, verbatim (tests/agent/test_via.py checks that they match): the
# first stage of the contexts we start. PREAMBLE_LEN is replaced as the master
# does.
_STAGE1 = """import os,sys,zlib
os.write(1,b'MITO000\\n')
n=PREAMBLE_LEN;p=[]
while n:
 b=os.read(0,n)
 if not b:sys.exit('mitogen: stdin closed during bootstrap')
 p.append(b);n-=len(b)
m=sys.modules;g=m['mitogen']=type(sys)('mitogen');g.__path__=[];c=g.core=m['mitogen.core']=type(sys)('mitogen.core')
exec(compile(zlib.decompress(b''.join(p)),'<mitogen.core>','exec'),c.__dict__)
c._bootstrap()
"""

_children = []        # direct children, alive
_route_lock = _thread.allocate_lock()   # guards _routes, _children, _Child.ids
_router_started = False
_id_block = [0, 0]    # ALLOCATE_ID block: next id, end (exclusive)
_id_lock = _thread.allocate_lock()


class _BootError(Exception):
    """A child failed to start; code names the failure as the master's
    errc does (spawn_failed, connect_timeout, child_died, ...)."""
    def __init__(self, code, text):
        Exception.__init__(self, text)
        self.code = code


# Bytes queued for one child above which senders wait (as the master's
# streams do), so a child that stops reading cannot make us hoard memory.
_MAX_QUEUED = 16 * 1024 * 1024


class _Child(object):
    """A directly connected child context and the subtree behind it.

    Frames for it are queued and written by a writer thread of its own, so
    a child that is not reading (busy in a long call) stalls only the
    traffic to it, never the routing for everyone else."""

    def __init__(self, context_id, name, proc, rfd, wfd):
        import threading
        self.id = context_id
        self.name = name
        self.proc = proc
        self.rfd = rfd                 # owned by the reader thread
        self.wfd = wfd                 # owned by the writer thread
        self.ids = set([context_id])   # its subtree, itself included
        self.parents = {}              # descendant id -> the id that started it
        self.sent = {}                 # context id -> module names sent to it
        self.cond = threading.Condition()   # guards queue, queued, gone
        self.queue = []
        self.queued = 0
        self.gone = False
        self.complained = False
        _thread.start_new_thread(self._writer, ())

    def write(self, frame):
        """Queue one whole frame; False if the child is gone. Waits while
        more than _MAX_QUEUED bytes are queued."""
        with self.cond:
            while self.queued > _MAX_QUEUED and not self.gone:
                self.cond.wait()
            if self.gone:
                return False
            self.queue.append(frame)
            self.queued += len(frame)
            self.cond.notify_all()
        return True

    def close(self):
        """No more writes; the writer thread closes the descriptor."""
        with self.cond:
            self.gone = True
            self.queue = []
            self.queued = 0
            self.cond.notify_all()

    def _writer(self):
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.gone:
                        self.cond.wait()
                    if self.gone:
                        return
                    frames, self.queue = self.queue, []
                for frame in frames:
                    _write_rest(self.wfd, frame, 0)
                with self.cond:
                    self.queued -= sum(len(f) for f in frames)
                    self.cond.notify_all()
        except OSError:
            self.close()   # the child is gone; its reader reports it
        finally:
            try:
                os.close(self.wfd)
            except OSError:
                pass

    def forward(self, msg):
        return self.write(_HEADER.pack(
            HEADER_MAGIC, msg.dst_id, msg.src_id, msg.auth_id, msg.handle,
            msg.reply_to, len(msg.data)) + msg.data)

    def send(self, dst_id, handle, data, reply_to=0):
        """A message from this context to `dst_id` in the child's subtree."""
        return self.write(_HEADER.pack(
            HEADER_MAGIC, dst_id, context_id, context_id, handle, reply_to,
            len(data)) + data)


def _dead_to_child(child, msg, reason):
    if msg.reply_to and not msg.is_dead:
        child.send(msg.src_id, msg.reply_to, reason.encode('utf-8'),
                   reply_to=IS_DEAD)


def _on_child_message(child, msg):
    ids = child.ids
    if msg.src_id not in ids or msg.auth_id not in ids:
        if not child.complained:
            child.complained = True
            _log(WARNING, 'context %d (%s) sent a message claiming src_id=%d '
                 'auth_id=%d; dropped (logged once)', child.id, child.name,
                 msg.src_id, msg.auth_id)
        return
    dst = msg.dst_id
    if dst == context_id:
        if not msg.is_dead:
            handle = msg.handle
            if handle == GET_MODULE:
                return _serve_module(child, msg)
            if handle == ADD_ROUTE:
                return _on_add_route(child, msg)
            if handle == DEL_ROUTE:
                return _on_del_route(child, msg)
        return _inbox._route(msg)
    other = _routes.get(dst)
    if other is not None:
        if not other.forward(msg):
            _dead_to_child(child, msg, 'no route to context %d' % dst)
        return
    _forward_up(msg)


def _parse_route(data):
    """b'<id>[:<name>]' -> (id, name); ValueError if malformed."""
    text = data.decode('utf-8')
    sid, _, name = text.partition(':')
    if not (sid.isdigit() and len(sid) <= 10):
        raise ValueError('bad context id %r' % (sid[:20],))
    return int(sid), name


def _on_add_route(child, msg):
    """A descendant of `child` started a context: route it through `child`
    and tell the parent, keeping src_id (the context that started it)."""
    try:
        target, _ = _parse_route(msg.data)
    except (ValueError, UnicodeError) as e:
        _log(WARNING, 'context %d sent a bad ADD_ROUTE: %s', child.id, e)
        return
    with _route_lock:
        current = _routes.get(target)
        if (target == 0 or target == context_id or target in parent_ids or
                (current is not None and current is not child)):
            ok = False
        else:
            ok = True
            child.ids.add(target)
            child.parents[target] = msg.src_id
            _routes[target] = child
    if not ok:
        _log(WARNING, 'context %d (%s) sent ADD_ROUTE for context %d, which '
             'it cannot own; refused', child.id, child.name, target)
        return
    msg.dst_id = parent_id
    _forward_up(msg)


def _subtree(child, target):
    """`target` and every id `child` reported as started below it."""
    out = [target]
    for ident in out:
        out.extend(i for i, p in child.parents.items() if p == ident)
    return out


def _on_del_route(child, msg):
    try:
        target, _ = _parse_route(msg.data)
    except (ValueError, UnicodeError):
        return
    with _route_lock:
        if target == child.id or target not in child.ids:
            return
        gone = _subtree(child, target)
        for ident in gone:
            child.ids.discard(ident)
            child.parents.pop(ident, None)
            child.sent.pop(ident, None)
            if _routes.get(ident) is child:
                del _routes[ident]
    _fail_waiters(gone, 'context %d disconnected (DEL_ROUTE from context %d)'
                  % (target, msg.src_id))
    msg.dst_id = parent_id
    _forward_up(msg)


def _child_gone(child, reason):
    """The child's stream ended: forget its subtree, report every id in it
    upward (DEL_ROUTE) and reap the process."""
    child.close()
    with _route_lock:
        ids = sorted(child.ids, key=lambda i: i != child.id)
        for ident in ids:
            if _routes.get(ident) is child:
                del _routes[ident]
        if child in _children:
            _children.remove(child)
    try:
        os.close(child.rfd)
    except OSError:
        pass
    _log(DEBUG, 'context %d (%s) disconnected: %s', child.id, child.name,
         reason)
    for ident in ids:
        _send(parent_id, DEL_ROUTE, str(ident).encode('ascii'))
    _fail_waiters(ids, 'context %d (%s) disconnected: %s' % (
        child.id, child.name, reason))
    _reap(child.proc)


def _fail_waiters(ids, reason):
    """A dead message for each of our reply handles waiting on one of `ids`
    (registered with _expect_reply)."""
    ids = set(ids)
    for handle, respondent in list(_respondents.items()):
        if respondent in ids and _respondents.pop(handle, None) is not None:
            _inbox._route(Message(context_id, respondent, respondent, handle,
                                  IS_DEAD, reason.encode('utf-8')))


def _reap(proc):
    try:
        proc.wait(1.0)
    except Exception:
        try:
            proc.kill()
            proc.wait(5.0)
        except Exception:
            pass


class _FrameReader(object):
    """Frames from a child's stream (a thread of its own: may block)."""

    def __init__(self, fd, buf, max_message_size):
        self.fd = fd
        self.buf = bytearray(buf)
        self.max_message_size = max_message_size

    def _take(self, n):
        buf = self.buf
        while len(buf) < n:
            chunk = os.read(self.fd, max(_READ_SIZE, n - len(buf)))
            if not chunk:
                return None
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def read(self):
        """The next Message, or None at EOF. Raises StreamError when framing
        is lost."""
        header = self._take(_HEADER_LEN)
        if header is None:
            return None
        (magic, dst_id, src_id, auth_id, handle, reply_to,
         length) = _HEADER.unpack(header)
        if magic != HEADER_MAGIC:
            raise StreamError('bad frame magic 0x%04x', magic & 0xffff)
        if length > self.max_message_size:
            raise StreamError('frame of %d bytes exceeds max_message_size',
                              length)
        data = self._take(length)
        if data is None:
            return None
        return Message(dst_id, src_id, auth_id, handle, reply_to, data)


def _child_reader(child, leftover):
    reader = _FrameReader(child.rfd, leftover, _inbox.max_message_size)
    reason = 'its stream closed'
    try:
        while True:
            msg = reader.read()
            if msg is None:
                break
            if _debug_fd is not None:
                _debug_log(DEBUG, 'from child %d: %r' % (child.id, msg))
            _on_child_message(child, msg)
    except BaseException as e:
        reason = str(e)
        _log(ERROR, 'context %d (%s): %s; disconnecting it', child.id,
             child.name, reason)
    finally:
        try:
            _child_gone(child, reason)
        except BaseException as e:
            _log(ERROR, 'cleaning up context %d failed: %r', child.id, e)


def _drain_stderr(fd, name):
    """Forward what a child (or its ssh client) writes on stderr after
    bootstrap, line by line."""
    pending = b''
    try:
        while True:
            chunk = os.read(fd, _READ_SIZE)
            if not chunk:
                break
            lines = (pending + chunk).split(b'\n')
            pending = lines.pop()[-_READ_SIZE:]
            for line in lines:
                _log(WARNING, '[%s] stderr: %s', name,
                     line.decode('utf-8', 'replace'))
    except OSError:
        pass
    finally:
        os.close(fd)


# -- module forwarding ---------------------------------------------------------

def _serve_module(child, msg):
    """GET_MODULE from a descendant: answer from our importer's cache, asking
    our parent (once per name, whoever else waits for it) if it is not there.
    Before the answer, send the related modules we have cached that this
    descendant was not sent yet (as the master does)."""
    try:
        fullname = msg.data.decode('ascii')
        if not (0 < len(fullname) <= 512 and
                all(part.isidentifier() for part in fullname.split('.'))):
            raise ValueError(fullname)
    except (UnicodeError, ValueError):
        _dead_to_child(child, msg, 'bad GET_MODULE name')
        return
    target = msg.src_id

    def answer():
        entry = _importer.cached(fullname)
        sent = child.sent.setdefault(target, set())
        tup, payload = entry
        top = fullname.partition('.')[0]
        for rel in tup[4] if tup[2] is not None else ():
            if rel in sent:
                continue
            rel_entry = _importer.cached(rel)
            if rel_entry is None or rel_entry[0][2] is None:
                continue
            if rel.partition('.')[0] != top and \
                    rel.partition('.')[0] not in sent:
                continue
            sent.add(rel)
            child.send(target, LOAD_MODULE,
                       rel_entry[1] or _encode(rel_entry[0]))
        sent.add(fullname)
        child.send(target, LOAD_MODULE, payload or _encode(tup))

    _importer.request(fullname, answer)


# -- starting children -----------------------------------------------------------

def _sh_quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def _popen(argv, argv0=None):
    import subprocess
    executable = argv[0]
    if argv0 is not None:
        argv = [argv0] + list(argv[1:])
    return subprocess.Popen(
        argv, executable=executable, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
        start_new_session=True)


def _spawn_local(options, stage1, remote_name):
    """Method 'local': a Python interpreter on this host."""
    python = options.get('python_path') or [sys.executable or
                                            '/usr/bin/python3']
    if isinstance(python, str):
        python = [python]
    proc = _popen(list(python) + ['-c', stage1], 'mitogen:' + remote_name)
    return proc, 'local.%d' % (proc.pid,)


def _spawn_ssh(options, stage1, remote_name):
    """Method 'ssh': the system ssh client, as the master's openssh
    transport runs it (docs/ssh.md)."""
    import binascii
    host = options.get('hostname')
    if not host:
        raise _BootError('spawn_failed', 'ssh needs a hostname')
    if options.get('password'):
        raise _BootError('spawn_failed', 'password authentication is not '
                         'available via=: use keys or an agent')
    argv = [options.get('ssh_path') or 'ssh',
            '-o', 'LogLevel=ERROR', '-o', 'BatchMode=yes']

    def opt(kv):
        argv.extend(('-o', kv))
    if options.get('ssh_config_file') is not None:
        argv.extend(('-F', options['ssh_config_file'] or '/dev/null'))
    if options.get('username'):
        argv.extend(('-l', options['username']))
    port = options.get('port')
    if port:
        argv.extend(('-p', str(int(port))))
    for key in options.get('identity_files') or ():
        argv.extend(('-i', key))
    if options.get('identity_files'):
        opt('IdentitiesOnly=yes')
    if options.get('use_agent') is False:
        opt('IdentityAgent=none')
    policy = options.get('check_host_keys') or 'enforce'
    if policy == 'ignore':
        opt('StrictHostKeyChecking=no')
        opt('UserKnownHostsFile=/dev/null')
        opt('GlobalKnownHostsFile=/dev/null')
    else:
        opt('StrictHostKeyChecking=' +
            ('accept-new' if policy == 'accept' else 'yes'))
        if options.get('known_hosts_file'):
            opt('UserKnownHostsFile=' + options['known_hosts_file'])
    opt('ConnectTimeout=%d' % max(1, int(options.get('connect_timeout')
                                         or 30)))
    keepalive = int(options.get('keepalive_interval') or 15)
    if keepalive > 0:
        opt('ServerAliveInterval=%d' % keepalive)
        opt('ServerAliveCountMax=%d' % int(options.get('keepalive_count')
                                           or 3))
    argv.extend(options.get('ssh_args') or ())
    b64 = binascii.b2a_base64(stage1.encode('utf-8')).decode().strip()
    tail = ' -c %s %s' % (
        _sh_quote('import base64;exec(base64.b64decode("%s"))' % b64),
        _sh_quote('mitogen:' + remote_name))
    python = options.get('python_path')
    if isinstance(python, str):
        python = [python]
    if python:
        command = ' '.join(_sh_quote(a) for a in python) + tail
    else:
        command = ('for p in python3 /usr/bin/python3 python; do command -v '
                   '"$p" >/dev/null 2>&1 && exec "$p"' + tail + '; done; '
                   'echo "mitogen: no python3 or python on $(hostname)" >&2; '
                   'exit 127')
    argv.extend((host, command))
    proc = _popen(argv)
    name = 'ssh.' + host + (':%d' % int(port) if port and int(port) != 22
                            else '')
    return proc, name


# --- sudo / su / doas started by this context (via=; docs/become.md) ---------
import signal
#
# The same "hybrid TTY" scheme as the master's become.cpp: the child's stdin and
# stdout are the protocol pipes, stderr a pipe, and a fresh pseudo-terminal is
# its controlling terminal (posix_spawn with setsid, then opening the terminal
# makes it the session's). sudo and doas prompt on the terminal; Linux su on
# stderr (answered on stdin). We answer the first prompt once, turn failure
# messages into the master's error codes, and return as soon as the
# interpreter writes to stdout (MITO000 follows). The terminal stays open for
# the child's lifetime (closing it would hang the child up).

_BECOME_PROMPTS = (
    u'password', u'passwort', u'mot de passe', u'contrase\xf1a',
    u'contrasenya', u'senha', u'wachtwoord', u'l\xf6senord', u'adgangskode',
    u'passord', u'salasana', u'has\u0142o', u'heslo', u'jelsz\xf3', u'parola',
    u'parool', u'lozinka', u'sandi', u'\u043f\u0430\u0440\u043e\u043b\u044c',
    u'\u043f\u0430\u0440\u043e\u043b\u0430', u'\u5bc6\u7801', u'\u5bc6\u78bc',
    u'\u30d1\u30b9\u30ef\u30fc\u30c9', u'\uc554\ud638',
    u'\u03c3\u03c5\u03bd\u03b8\u03b7\u03bc\u03b1\u03c4\u03b9\u03ba\u03cc',
    u'\u05e1\u05d9\u05e1\u05de\u05d4',
    u'\u0643\u0644\u0645\u0629 \u0627\u0644\u0633\u0631', u'm\u1eadt kh\u1ea9u',
)

# method -> (incorrect, not allowed, password required): lower-case substrings.
_BECOME_FAILURES = {
    'sudo': (('sorry, try again', 'incorrect password',
              'authentication failure'),
             ('is not in the sudoers file', 'is not allowed to execute',
              'may not run sudo', 'is not allowed to run sudo'),
             ('a password is required', 'no askpass program specified')),
    'su': (('su: sorry', 'su: authentication failure',
            'su: incorrect password', 'authentication is denied'),
           ('su: permission denied', 'su: you are not authorized'),
           ()),
    'doas': (('doas: authentication failed', 'doas: authorization failed'),
             ('doas: operation not permitted',),
             ('doas: a password is required',)),
}


class _BecomeProc(object):
    """A child started through sudo/su/doas: Popen's shape for _connect_child
    (pid, stdin, stdout, stderr, kill(), wait()), plus the terminal."""

    class _End(object):
        def __init__(self, fd):
            self.fd = fd

        def fileno(self):
            return self.fd

        def close(self):
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __init__(self, pid, stdin_w, stdout_r, stderr_r, tty_master):
        self.pid = pid
        self.stdin = self._End(stdin_w)
        self.stdout = self._End(stdout_r)
        self.stderr = self._End(stderr_r)
        self.tty = self._End(tty_master)
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self.returncode

    def _reaped(self, status):
        self.returncode = (os.WEXITSTATUS(status) if os.WIFEXITED(status)
                           else -os.WTERMSIG(status))
        self.tty.close()
        self.tty_slave.close()

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                import subprocess
                raise subprocess.TimeoutExpired('become', timeout)
            time.sleep(0.01)
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)


def _become_spawn(argv):
    """posix_spawn `argv` with pipes on 0/1/2 and a new terminal as its
    controlling terminal. Returns a _BecomeProc."""
    import pty
    import termios
    master, slave = pty.openpty()
    # No echo: a password typed at the terminal is never read back to us.
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    slave_path = os.ttyname(slave)
    # Our copy of the terminal stays open during the dialogue: without it the
    # master side reports hang-up until the child has opened the terminal.
    fds = []
    try:
        in_r, in_w = os.pipe()
        fds += [in_r, in_w]
        out_r, out_w = os.pipe()
        fds += [out_r, out_w]
        err_r, err_w = os.pipe()
        fds += [err_r, err_w]
        actions = [
            (os.POSIX_SPAWN_DUP2, in_r, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
            # After setsid(): opening a terminal makes it the controlling one.
            (os.POSIX_SPAWN_OPEN, 3, slave_path, os.O_RDWR, 0),
            (os.POSIX_SPAWN_CLOSE, 3),
        ]
        path = argv[0]
        if os.sep not in path:
            import shutil
            path = shutil.which(path) or path
        pid = os.posix_spawn(path, list(argv), os.environ,
                             file_actions=actions, setsid=True,
                             setsigdef=(signal.SIGINT, signal.SIGPIPE,
                                        signal.SIGHUP, signal.SIGTERM))
    except BaseException:
        for fd in fds + [master, slave]:
            os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    proc = _BecomeProc(pid, in_w, out_r, err_r, master)
    proc.tty_slave = proc._End(slave)
    return proc


def _become_dialogue(proc, method, options, deadline):
    """Answer the password prompt once; return when the interpreter writes
    to stdout. Raises _BootError with the master's codes on failure."""
    prompts = [p.lower() for p in (options.get('password_prompts') or
                                   _BECOME_PROMPTS)]
    defaults = _BECOME_FAILURES[method]
    incorrect = [p.lower() for p in (options.get('incorrect_prompts') or
                                     defaults[0])]
    not_allowed = [p.lower() for p in (options.get('not_allowed_prompts') or
                                       defaults[1])]
    required = defaults[2]
    password = options.get('password')
    target = options.get('username') or 'root'
    sent = [False]
    text = {True: b'', False: b''}     # terminal / stderr text so far
    poller = select.poll()
    tty_fd, err_fd, out_fd = (proc.tty.fileno(), proc.stderr.fileno(),
                              proc.stdout.fileno())
    for fd in (tty_fd, err_fd, out_fd):
        poller.register(fd, select.POLLIN)

    def seen(tty):
        data = text[tty].decode('utf-8', 'replace')
        if password:
            data = data.replace(password, '********')
        return data

    def fail(code, what):
        said = (seen(True) + ' ' + seen(False)).replace('\x00', '').strip()
        raise _BootError(code, '%s: %s%s' % (method, what,
                                             '; said: ' + said[-2048:]
                                             if said else ''))

    def check(tty):
        low = seen(tty).lower()
        after = low.rpartition(_SENT_MARK)[2] if sent[0] else low
        lines, _, partial = after.rpartition('\n')
        if any(p in low for p in not_allowed):
            fail('become_not_allowed', 'this user may not become %s' % target)
        if any(p in low for p in required):
            fail('become_password_required', 'a password is required to '
                 'become %s and none was given' % target)
        if sent[0] and any(p in lines for p in incorrect):
            fail('become_password_wrong', 'the password is incorrect')
        if partial.strip() and any(p in partial for p in prompts):
            if sent[0]:
                fail('become_password_wrong', 'the password is incorrect '
                     '(asked again)')
            if not password:
                fail('become_password_required', 'a password is required '
                     'to become %s and none was given' % target)
            sent[0] = True
            text[tty] += _SENT_MARK.encode()  # later lines are the verdict
            _write_rest(tty_fd if tty else proc.stdin.fileno(),
                        (password + '\n').encode('utf-8'), 0)

    open_fds = set([tty_fd, err_fd])
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            fail('connect_timeout', 'no interpreter within the connect '
                 'timeout (%s)' % ('password sent' if sent[0] else
                                   'no password prompt seen'))
        events = poller.poll(remaining * 1000)
        for fd, ev in events:
            if fd == out_fd:
                if ev & select.POLLIN:
                    return                  # the interpreter is talking
                fail('child_died', 'exited before starting the interpreter')
            try:
                chunk = os.read(fd, 4096)
            except OSError:                 # EIO: the terminal is closed
                chunk = b''
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            tty = fd == tty_fd
            if len(text[tty]) < 65536:
                text[tty] += chunk
            check(tty)
        if not open_fds and proc.poll() is not None:
            for tty in (True, False):
                check(tty)
            fail('child_died', 'exited with status %s before starting the '
                 'interpreter' % (proc.returncode,))


_SENT_MARK = u'\x00<password sent>\x00'


def _python_command(options, stage1, remote_name):
    python = options.get('python_path') or [sys.executable or 'python3']
    if isinstance(python, str):
        python = [python]
    import binascii
    b64 = binascii.b2a_base64(stage1.encode('utf-8')).decode().strip()
    return list(python) + ['-c', 'import base64;exec(base64.b64decode("%s"))'
                           % b64, 'mitogen:' + remote_name]


def _spawn_become(method, argv, options):
    deadline = time.monotonic() + float(options.get('connect_timeout') or 30)
    proc = _become_spawn(argv)
    try:
        _become_dialogue(proc, method, options, deadline)
    except BaseException:
        proc.tty.close()
        proc.tty_slave.close()
        raise
    # Keep reading the terminal for the child's life: something it runs may
    # write to /dev/tty, and would block once the terminal's buffer is full.
    # Our copy of the slave side (closed when the child is reaped) keeps the
    # terminal alive after doas has exec'd Python, which holds none of it.
    _thread.start_new_thread(_drain_tty, (os.dup(proc.tty.fileno()),))
    return proc, '%s.%s' % (method, options.get('username') or 'root')


def _drain_tty(fd):
    try:
        while os.read(fd, 65536):
            pass
    except OSError:      # EIO: every process holding the terminal is gone
        pass
    finally:
        os.close(fd)


def _spawn_sudo(options, stage1, remote_name):
    """Method 'sudo'."""
    argv = [options.get('sudo_path') or 'sudo', '-u',
            options.get('username') or 'root']
    if options.get('preserve_env'):
        argv.append('-E')
    if options.get('set_home'):
        argv.append('-H')
    if options.get('login'):
        argv.append('-i')
    for flag, key in (('-r', 'selinux_role'), ('-t', 'selinux_type')):
        if options.get(key):
            argv += [flag, options[key]]
    argv.append('--')
    return _spawn_become('sudo', argv + _python_command(options, stage1,
                                                        remote_name), options)


def _spawn_su(options, stage1, remote_name):
    """Method 'su': su runs its -c argument through the target's shell."""
    target = options.get('username') or 'root'
    cmd = ' '.join(_sh_quote(a) for a in _python_command(options, stage1,
                                                         remote_name))
    return _spawn_become('su', [options.get('su_path') or 'su', target, '-c',
                                cmd], options)


def _spawn_doas(options, stage1, remote_name):
    """Method 'doas'."""
    argv = [options.get('doas_path') or 'doas', '-u',
            options.get('username') or 'root']
    return _spawn_become('doas', argv + _python_command(options, stage1,
                                                        remote_name), options)


# Connection methods this agent can run: name -> fn(options, stage1,
# remote_name) returning (process, default context name). The process is a
# subprocess.Popen or a lookalike: .pid, .stdin/.stdout/.stderr (objects
# with fileno(); stderr may be None), .kill(), .wait(timeout). stdout must
# carry the agent's output from the start (a method with prompts, such as a
# PTY-based sudo, answers them before returning or wraps stdout so that what
# it returns starts clean; MITO000 may follow other output). Raise _BootError
# to fail with a message. docs/via.md, "Adding a method".
_METHODS = {
    'local': _spawn_local,
    'ssh': _spawn_ssh,
    'sudo': _spawn_sudo,
    'su': _spawn_su,
    'doas': _spawn_doas,
}


def _agent_preamble():
    """The compressed agent as stage 1 received it (kept by stage 1 in the
    `-c` module's `p`), to pass on unchanged."""
    chunks = getattr(_stage1_main, 'p', None)
    if not chunks:
        raise _BootError('spawn_failed', 'this context cannot start others: '
                         'its own bootstrap data is not available')
    return b''.join(chunks)


def _allocate_id():
    """A context id for a child started on our own initiative: from a block
    the master hands out on ALLOCATE_ID (upstream's format: a pickled
    (first, end) tuple, end exclusive)."""
    with _id_lock:
        if _id_block[0] >= _id_block[1]:
            handle, slot = _inbox.open_slot(0)
            try:
                _send(0, ALLOCATE_ID, b'', reply_to=handle)
                msg = _inbox.wait(slot)
            finally:
                _inbox.close_slot(handle)
            if msg.is_dead:
                raise _BootError('spawn_failed', 'ALLOCATE_ID refused: %s' %
                                 msg.data.decode('utf-8', 'replace'))
            block = _decode(msg.data)
            if not (type(block) is tuple and len(block) == 2 and
                    all(type(i) is int for i in block) and
                    0 < block[0] < block[1] <= 0xffffffff):
                raise _BootError('spawn_failed', 'bad ALLOCATE_ID reply')
            _id_block[:] = block
        ident = _id_block[0]
        _id_block[0] += 1
        return ident


def _read_until(fd, buf, marker, deadline, noise):
    """Read from fd into buf until `marker`; drop everything up to it (kept,
    bounded, in noise for error messages)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        i = buf.find(marker)
        if i >= 0:
            if len(noise) < 4096:
                noise += buf[:i][:4096 - len(noise)]
            del buf[:i + len(marker)]
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _BootError('connect_timeout', 'timeout')
        if poller.poll(remaining * 1000):
            chunk = os.read(fd, _READ_SIZE)
            if not chunk:
                # What it said before going ("This account is currently not
                # available.") is the reason: keep it for the message.
                if len(noise) < 4096:
                    noise += buf[:4096 - len(noise)]
                raise _BootError('child_died', 'the child exited during '
                                 'bootstrap')
            buf += chunk


def _boot_error_text(proc, err):
    """`err`'s text plus what the child said on stderr (briefly waited for)."""
    text = str(err)
    # How it ended, if it did on its own (briefly waited for).
    try:
        status = proc.wait(0.3)
    except Exception:
        status = None
    if status is not None and status >= 0:
        text += '; the child exited with status %d' % (status,)
    elif status is not None:
        text += '; the child was killed by signal %d' % (-status,)
    try:
        proc.kill()
    except Exception:
        pass
    stderr = getattr(proc, 'stderr', None)
    if stderr is not None:
        got = b''
        fd = stderr.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + 0.5
        while len(got) < 16384 and poller.poll(
                max(0, deadline - time.monotonic()) * 1000):
            chunk = os.read(fd, 16384)
            if not chunk:
                break
            got += chunk
        if got:
            text += '; stderr: ' + got.decode('utf-8', 'replace').strip()
    _reap(proc)
    return text


def _start_router_thread():
    """Once this context has children, a thread keeps reading from the
    parent (leader/follower: it reads whenever nobody else does), so that
    frames for descendants and module answers flow while the main thread
    runs a call."""
    global _router_started
    with _route_lock:
        if _router_started:
            return
        _router_started = True
    # From now on only this thread reads from the parent. A waiter that led
    # instead would block in read() while a child's reader thread queued its
    # reply (or the dead message of _fail_waiters) on its slot, and stay blocked
    # until the parent happened to send something. Set before the thread runs,
    # so nobody takes the role meanwhile; whoever holds it now hands it over
    # when its own message arrives (_Inbox._step_down).
    slot = _Slot()
    with _inbox._lock:
        _inbox.router = slot

    def run():
        try:
            _inbox.wait(slot)   # nothing is ever delivered to this slot
        except BaseException as e:
            _log(ERROR, 'router thread failed: %s', _format_exception(e))
            _exit(1)
    _thread.start_new_thread(run, ())
    import atexit
    atexit.register(_stop_children)


def _stop_children():
    """On SHUTDOWN: ask each child to shut down too and give them a moment."""
    with _route_lock:
        children = list(_children)
    for child in children:
        child.send(child.id, SHUTDOWN, b'')
    deadline = time.monotonic() + 1.0
    for child in children:
        try:
            child.proc.wait(max(0.01, deadline - time.monotonic()))
        except Exception:
            pass


def _connect_child(method, options, context_id, name):
    # _proxy_connect()'s body (its docstring says what this does).
    options = dict(options or {})
    proc = None
    try:
        spawn = _METHODS.get(method)
        if spawn is None:
            raise _BootError('spawn_failed', 'unknown connection method %r '
                             '(this agent knows %s)' %
                             (method, ', '.join(sorted(_METHODS))))
        preamble = _agent_preamble()
        if context_id is None:
            context_id = _allocate_id()
        if (type(context_id) is not int or context_id <= 0 or
                context_id == globals()['context_id'] or
                context_id in _routes):
            raise _BootError('spawn_failed', 'bad context id %r' %
                             (context_id,))
        remote_name = options.get('remote_name') or sys.argv[0].partition(
            ':')[2] or 'context%d' % context_id
        timeout = float(options.get('connect_timeout') or 30.0)
        stage1 = _STAGE1.rstrip('\n').replace('PREAMBLE_LEN',
                                              str(len(preamble)))
        try:
            proc, default_name = spawn(options, stage1, remote_name)
        except OSError as e:
            raise _BootError('spawn_failed', 'cannot start %s: %s' %
                             (method, e))
        name = name or default_name
        config = {
            'context_id': context_id,
            'parent_ids': [globals()['context_id']] + list(parent_ids),
            'remote_name': remote_name,
            'debug': bool(options.get('debug')),
            'log_level': int(options.get('log_level') or INFO),
            'max_message_size': int(options.get('max_message_size') or
                                    _inbox.max_message_size),
        }
        if _importer.whitelist != ['']:
            config['whitelist'] = list(_importer.whitelist)
        if _importer.blacklist:
            config['blacklist'] = list(_importer.blacklist)
        data = _encode(config)
        frame = _HEADER.pack(HEADER_MAGIC, context_id, config['parent_ids'][0],
                             config['parent_ids'][0], BOOTSTRAP, 0,
                             len(data)) + data
        rfd, wfd = proc.stdout.fileno(), proc.stdin.fileno()
        buf, noise = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            _read_until(rfd, buf, b'MITO000\n', deadline, noise)
            _write_rest(wfd, preamble + frame, 0)
            _read_until(rfd, buf, b'MITO001\n', deadline, noise)
        except _BootError as e:
            if e.code == 'connect_timeout':
                e = _BootError(e.code, 'no bootstrap within %d ms' %
                               (timeout * 1000))
            if noise:
                e = _BootError(e.code, '%s; stdout: %s' % (
                    e, bytes(noise).decode('utf-8', 'replace')))
            raise e
        except OSError as e:
            raise _BootError('child_died', 'bootstrap failed: %s' % (e,))
    except _BootError as e:
        text = _boot_error_text(proc, e) if proc is not None else str(e)
        return {'id': None, 'name': None, 'code': e.code,
                'msg': 'context %r failed to start on %s: %s' % (
                    name or method, os.uname()[1], text)}
    # Our own descriptors: the Popen file objects would close theirs again
    # when collected, maybe after the numbers were reused.
    rfd, wfd = _private_dup(rfd), _private_dup(wfd)
    proc.stdout.close()
    proc.stdin.close()
    child = _Child(context_id, name, proc, rfd, wfd)
    with _route_lock:
        _routes[context_id] = child
        _children.append(child)
    _start_router_thread()
    if proc.stderr is not None:
        _thread.start_new_thread(_drain_stderr,
                                 (os.dup(proc.stderr.fileno()), name))
        proc.stderr.close()
    # Upward before the reply: the master routes the id when the call returns.
    _send(parent_id, ADD_ROUTE, ('%d:%s' % (context_id, name)).encode('utf-8'))
    _thread.start_new_thread(_child_reader, (child, bytes(buf)))
    return {'id': context_id, 'name': name, 'msg': None}
'''


# Channels: Latch, Receiver, Channel, Select (docs/channels.md).
#
# A Latch is a queue between threads whose get() waits through the inbox:
# each waiting thread gets a _Slot, and if nobody is reading frames it becomes
# the reader itself (leader/follower, as for replies), so remote code waiting
# for items from the master never depends on another thread to read them. A
# reader waiting on a Latch polls the protocol fd and a wake pipe, so that a
# put() from another thread (or a timeout) ends its wait too.
#
# A Receiver is an inbox handler (run by whichever thread reads) that puts each
# message in its Latch. Select is a Latch of members that have something, as
# upstream's; remote code imports it as `mitogen.select` (registered in
# sys.modules below). Sender.send() encodes and writes on the calling thread.
#
# _chan_wait() is _Inbox.wait() plus a timeout and the wake pipe: it takes and
# hands over the reader role through the same _Inbox fields (_reading, _leader,
# _sleeping, _step_down), so a change to that protocol must be made in both.
# It adds no state to _Inbox.

class LatchError(Error):
    """The Latch was closed."""


_CLOSED = object()              # delivered to a Latch's waiters by close()
_wake_fds = None                # (r, w): wakes a reader waiting on a Latch
_leading_slot = None            # the slot of the reader waiting on a Latch
_chan_lock = _thread.allocate_lock()


def _wake_pipe():
    global _wake_fds
    with _chan_lock:
        if _wake_fds is None:
            r, w = os.pipe()
            fds = (_private_dup(r), _private_dup(w))
            os.close(r)
            os.close(w)
            for fd in fds:
                os.set_blocking(fd, False)
            _wake_fds = fds
    return _wake_fds


def _chan_deliver(slot, item):
    """Give `item` to the thread waiting on `slot`, waking it wherever it
    sleeps (on its lock, or reading frames in poll())."""
    inbox = _inbox
    if inbox is None:               # not bootstrapped (unit tests)
        slot.queue.append(item)
        if slot.sleeping:
            slot.sleeping = False
            slot.wake.release()
        return
    inbox.deliver(slot, item)
    if _leading_slot is slot and not inbox.is_reader():
        try:
            os.write(_wake_pipe()[1], b'x')
        except OSError:             # pipe full: a wake-up is pending anyway
            pass


def _chan_wait(slot, timeout):
    """Return the next item delivered to `slot`, reading frames if nobody
    else does. Raises TimeoutError after `timeout` seconds."""
    global _leading_slot
    inbox = _inbox
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if inbox is None:
            lead = False
            with _chan_lock:
                if slot.queue:
                    return slot.queue.pop(0)
                slot.sleeping = True
        else:
            with inbox._lock:
                if slot.queue:
                    return slot.queue.pop(0)
                lead = not inbox._reading and inbox.router is None
                if lead:
                    inbox._reading = True
                    inbox._leader = _thread.get_ident()
                else:
                    slot.sleeping = True
                    inbox._sleeping.append(slot)
        if not lead:
            if deadline is None:
                slot.wake.acquire()
                continue
            if slot.wake.acquire(True, max(0.0, deadline - time.monotonic())):
                continue
            lock = _chan_lock if inbox is None else inbox._lock
            with lock:
                timed_out = slot.sleeping
                if timed_out:
                    slot.sleeping = False
                    if inbox is not None:
                        inbox._sleeping.remove(slot)
            if timed_out:
                raise TimeoutError('no message within %r seconds' % (timeout,))
            slot.wake.acquire()     # the wake-up that raced with the timeout
            continue
        wake_r = _wake_pipe()[0]
        _leading_slot = slot
        try:
            poller = select.poll()
            poller.register(inbox._file.fileno(), select.POLLIN)
            poller.register(wake_r, select.POLLIN)
            while not slot.queue:
                if inbox._end == inbox._start:   # nothing buffered: wait
                    if deadline is None:
                        ms = None
                    else:
                        ms = int((deadline - time.monotonic()) * 1000) + 1
                        if ms <= 0:
                            raise TimeoutError(
                                'no message within %r seconds' % (timeout,))
                    ready = [fd for fd, _ in poller.poll(ms)]
                    if wake_r in ready:
                        try:
                            os.read(wake_r, 4096)
                        except OSError:
                            pass
                    if inbox._file.fileno() not in ready:
                        continue
                inbox._route(inbox.read_frame())
        finally:
            _leading_slot = None
            inbox._step_down()


class Latch(object):
    """A thread-safe queue (upstream's mitogen.core.Latch): put() from any
    thread, get() waits (reading frames meanwhile if nobody else does)."""
    notify = None                   # set by Select: notify(latch) after put()

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._queue = []
        self._waiters = []          # slots of threads blocked in get()
        self.closed = False

    def close(self):
        """Wake every waiter with LatchError; later calls raise it too."""
        with self._lock:
            self.closed = True
            waiters, self._waiters = self._waiters, []
            for slot in waiters:
                _chan_deliver(slot, _CLOSED)

    def size(self):
        with self._lock:
            if self.closed:
                raise LatchError()
            return len(self._queue)

    def empty(self):
        return self.size() == 0

    def put(self, obj=None):
        with self._lock:
            if self.closed:
                raise LatchError()
            if self._waiters:
                _chan_deliver(self._waiters.pop(0), obj)
            else:
                self._queue.append(obj)
        notify = self.notify
        if notify is not None:
            notify(self)

    def get(self, timeout=None, block=True):
        with self._lock:
            if self.closed:
                raise LatchError()
            if self._queue:
                return self._queue.pop(0)
            if not block:
                raise TimeoutError()
            slot = _Slot()
            self._waiters.append(slot)
        try:
            item = _chan_wait(slot, timeout)
        except BaseException:
            with self._lock:
                if slot in self._waiters:
                    self._waiters.remove(slot)
                    raise
            item = slot.queue.pop(0)    # put() chose us just as we gave up
        if item is _CLOSED:
            raise LatchError()
        return item

    def __repr__(self):
        return 'Latch(%#x, size=%d)' % (id(self), len(self._queue))


class Receiver(object):
    """Messages sent to one handle of this context (upstream's
    mitogen.core.Receiver). `router` is accepted for compatibility and may be
    None: a context has one inbox. `respondent` (a Context or id): accept
    only its messages. `policy(msg, None)` -> bool filters on the reading
    thread (it must be quick)."""
    notify = None
    closed_msg = 'the Receiver has been closed'

    def __init__(self, router=None, handle=None, persist=True,
                 respondent=None, policy=None, overwrite=False):
        if _inbox is None:
            raise Error('Receiver: this context is not running')
        self.router = router
        self.persist = persist
        self.policy = policy
        self.respondent = getattr(respondent, 'context_id', respondent)
        self._latch = Latch()
        self._dead = None           # the dead message that ended the channel
        if handle is None:
            handle = _inbox.new_handle()
        elif not overwrite and handle in _inbox._handlers:
            raise Error('handle %d already has a handler', handle)
        self.handle = handle
        _inbox.add_handler(handle, self._on_receive)

    def __repr__(self):
        return 'Receiver(%r)' % (self.handle,)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def to_sender(self):
        return Sender(Context(context_id), self.handle)

    def _on_receive(self, msg):
        # Run by the thread reading frames: quick, never blocks.
        if not msg.is_dead:
            if self.respondent is not None and msg.src_id != self.respondent:
                _complain(msg.src_id, '%r: dropped %r: not from the '
                          'respondent', self, msg)
                return
            if self.policy is not None and not self.policy(msg, None):
                _complain(msg.src_id, '%r: policy refused %r', self, msg)
                return
        if not self.persist or msg.is_dead:
            _inbox.del_handler(self.handle)
        try:
            self._latch.put(msg)
        except LatchError:
            return                  # closed meanwhile
        notify = self.notify
        if notify is not None:
            notify(self)

    def close(self):
        if self.handle is not None:
            _inbox.del_handler(self.handle)
        self._latch.close()

    def size(self):
        return self._latch.size()

    def empty(self):
        return self._latch.empty()

    def get(self, timeout=None, block=True, throw_dead=True):
        """The next Message; ChannelError once the channel ended."""
        try:
            msg = self._latch.get(timeout=timeout, block=block)
        except LatchError:
            if self._dead is not None:
                self._dead.unpickle()   # keep answering with the same error
            raise ChannelError(self.closed_msg)
        if msg.is_dead and throw_dead:
            self._dead = msg
            self._latch.close()
            msg.unpickle()
        return msg

    def __iter__(self):
        while True:
            try:
                msg = self.get()
            except ChannelError:
                return
            yield msg


class Channel(Sender, Receiver):
    """A Sender and a Receiver in one object (upstream's deprecated sugar)."""
    def __init__(self, router, context, dst_handle, handle=None):
        Sender.__init__(self, context, dst_handle)
        Receiver.__init__(self, router, handle)

    def close(self):
        Receiver.close(self)
        Sender.close(self)

    def __repr__(self):
        return 'Channel(%s, %s)' % (Sender.__repr__(self),
                                    Receiver.__repr__(self))


class SelectError(Error):
    pass


class Event(object):
    source = None
    data = None


class Select(object):
    """Upstream's mitogen.select.Select, over this section's Receivers,
    Latches and Selects."""
    notify = None
    loop_msg = 'Adding this Select instance would create a Select cycle'
    owned_msg = 'Cannot add: Receiver is already owned by another Select'
    not_present_msg = 'Instance is not a member of this Select'
    empty_msg = 'Cannot get(), Select instance is empty'

    def __init__(self, receivers=(), oneshot=True):
        self._receivers = []
        self._oneshot = oneshot
        self._latch = Latch()
        for recv in receivers:
            self.add(recv)

    @classmethod
    def all(cls, receivers):
        return list(msg.unpickle() for msg in cls(receivers))

    def _put(self, value):
        self._latch.put(value)
        if self.notify:
            self.notify(self)

    def __bool__(self):
        return bool(self._receivers)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def iter_data(self):
        while self._receivers:
            yield self.get_event().data

    __iter__ = iter_data

    def iter_events(self):
        while self._receivers:
            yield self.get_event()

    def _check_no_loop(self, recv):
        if recv is self:
            raise SelectError(self.loop_msg)
        for member in self._receivers:
            if member is recv:
                raise SelectError(self.loop_msg)
            if isinstance(member, Select):
                member._check_no_loop(recv)

    def add(self, recv):
        if isinstance(recv, Select):
            recv._check_no_loop(self)
        if recv.notify is not None:
            raise SelectError(self.owned_msg)
        self._receivers.append(recv)
        recv.notify = self._put
        for _ in range(recv.size()):
            self._put(recv)

    def remove(self, recv):
        if recv.notify != self._put or recv not in self._receivers:
            raise SelectError(self.not_present_msg)
        self._receivers.remove(recv)
        recv.notify = None

    def close(self):
        for recv in self._receivers[:]:
            self.remove(recv)
        self._latch.close()

    def size(self):
        return sum(recv.size() for recv in self._receivers)

    def empty(self):
        return self._latch.empty()

    def get(self, timeout=None, block=True):
        return self.get_event(timeout, block).data

    def get_event(self, timeout=None, block=True):
        if not self._receivers:
            raise SelectError(self.empty_msg)
        while True:
            recv = self._latch.get(timeout=timeout, block=block)
            try:
                if isinstance(recv, Select):
                    event = recv.get_event(block=False)
                else:
                    event = Event()
                    event.source = recv
                    event.data = recv.get(block=False)
                if self._oneshot:
                    self.remove(recv)
                if isinstance(recv, Receiver):
                    event.data.receiver = recv
                return event
            except TimeoutError:
                continue


def _register_select_module():
    """`import mitogen.select` in remote code finds this, never the parent's
    upstream module."""
    mod = type(sys)('mitogen.select')
    mod.Select = Select
    mod.Event = Event
    mod.Error = SelectError
    mod.Latch = Latch
    sys.modules['mitogen.select'] = mod
    package = sys.modules.get('mitogen')
    if package is not None and getattr(package, '__name__', '') == 'mitogen':
        package.select = mod


_register_select_module()


# ---------------------------------------------------------------------------
# Bootstrap.

def _redirect_stdio():
    """Point fd 0 at /dev/null and fds 1/2 at pipes read by the watcher."""
    null = os.open('/dev/null', os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, 'stdout'), (2, 'stderr')):
        r, w = os.pipe()
        os.dup2(w, fd)           # inheritable, so subprocesses' output is kept
        os.close(w)
        private = _private_dup(r)
        os.close(r)
        r = private
        os.set_blocking(r, False)
        _pipes[r] = [name, b'']
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    sys.stdout = io.open(1, 'w', buffering=1, encoding='utf-8',
                         errors='backslashreplace', closefd=False)
    sys.stderr = io.open(2, 'w', buffering=1, encoding='utf-8',
                         errors='backslashreplace', closefd=False)


def _private_dup(fd):
    """Duplicate fd close-on-exec (subprocesses never see the protocol) and
    high up, out of the way of user code that dup2()s onto low numbers."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _PRIVATE_FD_MIN)
    except (AttributeError, OSError):   # no F_DUPFD_CLOEXEC, or a low rlimit
        return os.dup(fd)


def _bootstrap():
    """Entry point, called by stage 1 with the protocol on fds 0 and 1 and the
    master's boot-time stderr pipe on fd 2. Never returns."""
    global context_id, parent_id, parent_ids, _log_level, _debug_fd
    global _inbox, _out_fd, _importer, _stage1_main
    boot_stderr = os.dup(2)
    try:
        in_fd, out_fd = _private_dup(0), _private_dup(1)
        _inbox = _Inbox(in_fd, DEFAULT_MAX_MESSAGE_SIZE)
        msg = _inbox.read_frame()
        if msg.handle != BOOTSTRAP:
            raise StreamError('expected the BOOTSTRAP frame, got handle %d',
                              msg.handle)
        config = _decode(msg.data)

        context_id = config['context_id']
        parent_ids = list(config.get('parent_ids') or [0])
        parent_id = parent_ids[0]
        _log_level = config.get('log_level', INFO)
        _inbox.max_message_size = config.get('max_message_size',
                                             DEFAULT_MAX_MESSAGE_SIZE)
        remote_name = config.get('remote_name') or 'context%d' % context_id
        package = sys.modules.get('mitogen')
        if package is not None:
            package.context_id = context_id
            package.parent_id = parent_id
            package.parent_ids = parent_ids
            package.is_master = False
        if config.get('debug'):
            try:
                _debug_fd = _open_debug_log()
            except OSError as e:
                _write_boot_error('no debug log: %s' % (e,))
        if _debug_fd is not None:
            _debug_log(INFO, 'bootstrap: context_id=%r parent_ids=%r name=%r'
                       % (context_id, parent_ids, remote_name))

        # argv[0] is 'mitogen:<name>', which CPython cannot resolve to a path.
        if not sys.executable:
            try:
                sys.executable = os.readlink('/proc/self/exe')
            except OSError:
                pass
        sys.argv = ['mitogen:%s' % (remote_name,)]

        _redirect_stdio()
        # Modules missing here are fetched from the parent; upstream's config
        # keys give the allow and deny prefixes (checked again up there).
        _importer = _Importer(_inbox, config.get('whitelist') or (),
                              config.get('blacklist') or ())
        sys.meta_path.append(_importer)
        _stage1_main = sys.modules.get('__main__')
        if 'logging' in sys.modules:
            _install_log_handler(sys.modules['logging'])
        else:
            sys.meta_path.insert(0, _LoggingImportHook())

        os.write(out_fd, b'MITO001\n')
        _out_fd = out_fd
        os.close(boot_stderr)
        boot_stderr = None
        _thread.start_new_thread(_watch, (in_fd,))
    except BaseException as e:
        if boot_stderr is not None:
            try:
                os.write(boot_stderr, ('mitogen: bootstrap failed: %s\n'
                                       % _format_exception(e)).encode())
            except OSError:
                pass
        os._exit(1)
    try:
        _serve()
    except BaseException as e:   # a bug in the agent: say so, never linger
        _log(ERROR, 'agent failed: %s', _format_exception(e))
        _exit(1)
