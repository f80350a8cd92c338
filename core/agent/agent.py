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
_debug_fd = None        # /tmp/mitogen.<pid>.log when config['debug']


def _send(dst_id, handle, data, reply_to=0):
    """Write one frame to the parent. Safe from any thread. If the parent is
    gone the write fails, and there is nothing left to do but exit."""
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
    _send(0, FORWARD_LOG,
          ('%s\0%d\0%s' % (name, levelno, text)).encode('utf-8', 'replace'))


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
# uncontended lock operations.

class _Slot(object):
    __slots__ = ('queue', 'wake', 'sleeping')

    def __init__(self):
        self.queue = []
        self.wake = _thread.allocate_lock()
        self.wake.acquire()        # held while nobody needs waking
        self.sleeping = False


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

    # -- slots and handlers --------------------------------------------------

    def new_handle(self):
        """A fresh handle for replies addressed to this context."""
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
        return handle

    def open_slot(self):
        """Allocate a reply handle and its slot. Open it *before* sending the
        request, so that the reply cannot arrive before anyone expects it."""
        slot = _Slot()
        handle = self.new_handle()
        with self._lock:
            self._slots[handle] = slot
        return handle, slot

    def close_slot(self, handle):
        """Forget a reply handle; later messages to it are refused."""
        with self._lock:
            self._slots.pop(handle, None)

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
                lead = not self._reading
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
        # Hand the reader role to a sleeping waiter, if any.
        with self._lock:
            self._reading = False
            self._leader = None
            if self._sleeping:
                self._wake(self._sleeping[0])

    def _wake(self, slot):
        # Called with self._lock held.
        slot.sleeping = False
        self._sleeping.remove(slot)
        slot.wake.release()

    def _route(self, msg):
        """Deliver `msg` to its slot or handler, or refuse it."""
        if msg.dst_id != context_id:
            return self._refuse(msg, 'no route to context %d' % msg.dst_id)
        handle = msg.handle
        with self._lock:
            if handle == CALL_FUNCTION or handle == SHUTDOWN:
                slot = self.main
            else:
                slot = self._slots.get(handle)
            if slot is not None:
                slot.queue.append(msg)
                if slot.sleeping:
                    self._wake(slot)
                return
            fn = self._handlers.get(handle)
        if fn is None:
            return self._refuse(msg, 'no handler for handle %d' % handle)
        try:
            fn(msg)
        except Exception as e:   # a handler bug must not kill the reader
            _log(ERROR, 'handler for handle %d failed: %s', handle,
                 _format_exception(e))

    def _refuse(self, msg, reason):
        if msg.is_dead:
            if _debug_fd is not None:
                _debug_log(DEBUG, 'dropped dead %r: %s' % (msg, reason))
        elif msg.reply_to:
            _send(msg.src_id, msg.reply_to, reason.encode('utf-8'),
                  reply_to=IS_DEAD)
        else:
            _log(WARNING, 'dropped %r: %s', msg, reason)

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
        if msg.auth_id != parent_id and msg.auth_id not in parent_ids:
            _log(WARNING, 'dropped LOAD_MODULE from context %d: not a '
                 'parent', msg.auth_id)
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
# Output forwarding and the parent watcher (one background thread).

_fwd_lock = _thread.allocate_lock()   # serialises reads of the output pipes
_pipes = {}                           # read fd -> [logger name, partial line]


def _pump(fd):
    """Forward the complete lines fd has ready. Returns True if data was
    read, None if none was ready, False at EOF (the partial line is then
    forwarded too)."""
    name_partial = _pipes[fd]
    try:
        chunk = os.read(fd, _READ_SIZE)
    except BlockingIOError:
        return None
    if not chunk:
        if name_partial[1]:
            _forward_log(name_partial[0], INFO,
                         name_partial[1].decode('utf-8', 'replace'))
            name_partial[1] = b''
        return False
    lines = (name_partial[1] + chunk).split(b'\n')
    name_partial[1] = lines.pop()
    if len(name_partial[1]) >= _READ_SIZE:   # no newline in sight: send it
        lines.append(name_partial[1])
        name_partial[1] = b''
    for line in lines:
        _forward_log(name_partial[0], INFO, line.decode('utf-8', 'replace'))
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
            while _pump(fd):
                pass
            if name_partial[1]:
                _forward_log(name_partial[0], INFO,
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
        while True:
            for fd, event in poller.poll():
                if fd == in_fd:
                    if _out_fd is not None:
                        # Don't let a dead parent's full pipe block the exit.
                        try:
                            os.set_blocking(_out_fd, False)
                        except OSError:
                            pass
                    _exit(0, 'parent hung up')
                with _fwd_lock:
                    if _pump(fd) is False:
                        poller.unregister(fd)
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
                _forward_log(record.name, record.levelno, self.format(record))
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
                lead = not inbox._reading
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
                _log(WARNING, '%r: dropped %r: not from the respondent',
                     self, msg)
                return
            if self.policy is not None and not self.policy(msg, None):
                _log(WARNING, '%r: policy refused %r', self, msg)
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
            _debug_fd = os.open('/tmp/mitogen.%d.log' % os.getpid(),
                                os.O_WRONLY | os.O_CREAT | os.O_APPEND |
                                os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
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
