"""Shared by the wire tests' Python helpers: stand-ins for mitogen.core's wire classes,
a restricted unpickler, a strict equality, and the named sample values that
test_cpython.cpp mirrors (keep the two tables in sync)."""
import io
import math
import pickle
import struct
import sys
import types


# --- stand-ins for mitogen.core (same reduce shapes as Mitogen 0.3) ------------------

class Kwargs(dict):
    def __reduce__(self):
        return (Kwargs, (dict(self),))


class Blob(bytes):
    def __reduce__(self):
        return (Blob, (bytes(self),))


class Secret(str):
    def __reduce__(self):
        return (Secret, (str(self),))


class CallError(Exception):
    def __reduce__(self):
        return (_unpickle_call_error, (self.args[0],))

    def __eq__(self, other):
        return type(other) is CallError and self.args == other.args

    __hash__ = Exception.__hash__


def _unpickle_call_error(s):
    return CallError(s)


class Context:
    def __init__(self, context_id, name=None):
        self.context_id = context_id
        self.name = name

    def __reduce__(self):
        return (_unpickle_context, (self.context_id, self.name))

    def __eq__(self, other):
        return type(other) is Context and (self.context_id, self.name) == (other.context_id, other.name)

    def __hash__(self):
        return hash(self.context_id)

    def __repr__(self):
        return 'Context(%r, %r)' % (self.context_id, self.name)


def _unpickle_context(context_id, name):
    return Context(context_id, name)


class Sender:
    def __init__(self, context, dst_handle):
        self.context = context
        self.dst_handle = dst_handle

    def __reduce__(self):
        return (_unpickle_sender, (self.context.context_id, self.dst_handle))

    def __eq__(self, other):
        return (type(other) is Sender and self.context == other.context and
                self.dst_handle == other.dst_handle)

    def __hash__(self):
        return hash(self.dst_handle)

    def __repr__(self):
        return 'Sender(%r, %r)' % (self.context, self.dst_handle)


def _unpickle_sender(context_id, dst_handle):
    return Sender(Context(context_id), dst_handle)


class _DEAD:
    def __reduce__(self):
        return (_DEAD, ())

    def __eq__(self, other):
        return type(other) is _DEAD

    def __hash__(self):
        return 0

    def __repr__(self):
        return '_DEAD()'


# Register as the importable module mitogen.core so pickle writes the right GLOBALs.
_core = types.ModuleType('mitogen.core')
for _name in ('Kwargs', 'Blob', 'Secret', 'CallError', '_unpickle_call_error', 'Context',
              '_unpickle_context', 'Sender', '_unpickle_sender', '_DEAD'):
    obj = globals()[_name]
    if isinstance(obj, type):
        obj.__module__ = 'mitogen.core'
    else:
        obj.__module__ = 'mitogen.core'
    setattr(_core, _name, obj)
_pkg = types.ModuleType('mitogen')
_pkg.__path__ = []
_pkg.core = _core
sys.modules['mitogen'] = _pkg
sys.modules['mitogen.core'] = _core


# --- restricted unpickler: what our Python agent would accept ---------------------------

_ALLOWED = {
    ('mitogen.core', 'Kwargs'): Kwargs,
    ('mitogen.core', 'Blob'): Blob,
    ('mitogen.core', 'Secret'): Secret,
    ('mitogen.core', '_unpickle_call_error'): _unpickle_call_error,
    ('mitogen.core', 'CallError'): _unpickle_call_error,
    ('mitogen.core', '_unpickle_context'): _unpickle_context,
    ('mitogen.core', '_unpickle_sender'): _unpickle_sender,
    ('mitogen.core', '_DEAD'): _DEAD,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if (module, name) == ('_codecs', 'encode'):
            import _codecs
            return _codecs.encode
        if module in ('builtins', '__builtin__') and name in ('bytes', 'bytearray'):
            return {'bytes': bytes, 'bytearray': bytearray}[name]
        raise pickle.UnpicklingError('forbidden global %s.%s' % (module, name))


def restricted_loads(data):
    return RestrictedUnpickler(io.BytesIO(data)).load()


def same(a, b):
    """Equal *and* of the same types all the way down (1 != True != 1.0 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack('<d', a) == struct.pack('<d', b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        if len(a) != len(b) or list(a.keys()) != list(b.keys()):
            return False
        return all(same(k1, k2) and same(a[k1], b[k2]) for k1, k2 in zip(a, b))
    return a == b


# --- named samples (mirrored in test_cpython.cpp) ---------------------------------------

def samples():
    shared = [1]
    return [
        ('none', None),
        ('true', True),
        ('false', False),
        ('int0', 0),
        ('int255', 255),
        ('int256', 256),
        ('int65535', 65535),
        ('int65536', 65536),
        ('neg1', -1),
        ('i32max', 2**31 - 1),
        ('i32min', -2**31),
        ('i32max_plus1', 2**31),
        ('i32min_minus1', -2**31 - 1),
        ('i64max', 2**63 - 1),
        ('i64min', -2**63),
        ('pow2_64', 2**64),
        ('neg_pow2_70', -2**70),
        ('pow2_1000', 2**1000),
        ('pow2_3000', 2**3000),
        ('neg_pow2_3000', -2**3000),
        ('float', 1.5),
        ('neg_zero', -0.0),
        ('inf', float('inf')),
        ('str_empty', ''),
        ('str_ascii', 'hello'),
        ('str_unicode', 'h\u00e9\u20ac\U0001f600'),
        ('bytes_empty', b''),
        ('bytes_small', b'a\x00\xff'),
        ('bytes_70k', bytes(i % 256 for i in range(70000))),
        ('bytearray_empty', bytearray()),
        ('bytearray', bytearray(b'ab\xff')),
        ('list_empty', []),
        ('list1', [1]),
        ('list_mixed', [1, 'a', None, True, 1.5, b'b']),
        ('list_2500', list(range(2500))),
        ('tuple0', ()),
        ('tuple1', (1,)),
        ('tuple2', (1, 2)),
        ('tuple3', (1, 2, 3)),
        ('tuple5', (1, 2, 3, 4, 5)),
        ('dict_empty', {}),
        ('dict1', {'a': 1}),
        ('dict_tuple_keys', {(1, 2): 'x', (3, (4, 5)): [6], None: False, b'k': 1.0}),
        ('dict_nested', {'a': {'b': {'c': [1, {'d': None}]}}}),
        ('dict_1500', {i: str(i) for i in range(1500)}),
        ('shared_list', [shared, shared]),
        ('shared_dict', {'a': shared, 'b': (shared, shared)}),
        ('kwargs', Kwargs({'a': 1, 'b': [2]})),
        ('blob', Blob(b'\x00blob')),
        ('secret', Secret('pw')),
        ('call_error', CallError('builtins.ValueError: boom\ntraceback')),
        ('context', Context(3, 'name')),
        ('context_noname', Context(7, None)),
        ('sender', Sender(Context(2), 1000)),
        ('dead', _DEAD()),
        ('call', (None, 'os', None, 'getpid', (1, b'x'), Kwargs({'k': 'v'}))),
    ]
