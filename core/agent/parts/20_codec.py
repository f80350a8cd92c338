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
    __slots__ = ('data', 'used')

    def __init__(self, data):
        self.data = data
        self.used = 0

    def peek(self, n):
        data, self.data = self.data, b''
        return data

    def read(self, n):
        self.used += n    # the unpickler skipping what it decoded
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
    t = type(obj)
    if t in _SCALAR_TYPES:      # leaves: nothing to check
        return _pickle_mod.dumps(obj, _PICKLE_PROTOCOL)
    _check_value(obj)
    if t in _SIZED_TYPES and len(obj) < 65536:
        return _pickle_mod.dumps(obj, _PICKLE_PROTOCOL)
    # dumps() copies every bytes value into a growing buffer: ~1 ms per MiB of
    # fresh pages. A Pickler writing to BytesIO hands big values over by
    # reference. Costs ~1.5 us more for small values, so scalars skip it.
    f = io.BytesIO()
    _pickle_mod.Pickler(f, _PICKLE_PROTOCOL).dump(obj)
    return f.getbuffer()


