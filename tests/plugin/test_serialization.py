"""The serialization rules: what may cross the wire, in both directions, and the
refusal of everything else at the caller."""
import collections
import copy
import enum
import os

import pytest

import mitogen_native.core
from mitogen_native import _native
from mitogen_native.core import CallError, Context, _DEAD, Kwargs, Blob, Secret

import remote_helpers

INTS = [0, 1, -1, 127, 128, -128, -129, 255, 256, 2**31, -2**31 - 1, 2**63 - 1, -2**63,
        2**63, -2**63 - 1, 2**64, 2**100, -2**100, 10**400, -10**400]

ALLOWED = [
    None, True, False, 1.5, float('inf'), -0.0,
    b'', b'bytes\x00\xff', bytearray(), bytearray(b'ba\x00'),
    '', 'text', 'unicod\u00e9 \U0001f600',
    [], [1, [2, [3]]], (), (1,), (1, 'a', (2.5, None)),
    {}, {'a': 1, 2: [3], (4, 5): {'x': b'y'}},
] + INTS


@pytest.mark.parametrize('value', ALLOWED, ids=repr)
def test_roundtrip_in_process(shared_router, value):
    out = _native._roundtrip(value, shared_router)
    assert out == value and type(out) is type(value)


def test_allowed_values_through_a_context(context):
    for value in ALLOWED:
        out = context.call(remote_helpers.identity, value)
        assert out == value and type(out) is type(value), value


def test_bool_is_not_int(context):
    assert context.call(remote_helpers.type_names, True, 1, 2**70) == ['bool', 'int', 'int']
    assert context.call(remote_helpers.identity, True) is True


def test_nested_types_kept(context):
    value = {'t': (1, [b'x', bytearray(b'y')]), 'l': [('a',), {}]}
    assert context.call(copy.deepcopy, value) == value
    assert context.call(remote_helpers.type_names, b'', bytearray(), '', (), [], {}) == \
        ['bytes', 'bytearray', 'str', 'tuple', 'list', 'dict']


def test_kwargs_reach_the_function(context):
    args, kwargs = context.call(remote_helpers.echo, 1, b'2', three=[3], four={'4': 4})
    assert args == (1, b'2') and kwargs == {'three': [3], 'four': {'4': 4}}


def test_wire_classes(context):
    assert context.call(remote_helpers.identity, _DEAD()) is _DEAD()
    # A CallError travels as a value inside a container; returned bare it is
    # raised, as upstream does.
    [err] = context.call(remote_helpers.identity, [CallError('builtins.ValueError: x\ntb')])
    assert type(err) is CallError and err.type_name == 'builtins.ValueError'
    with pytest.raises(CallError, match='builtins.ValueError: x'):
        context.call(remote_helpers.identity, err)
    assert context.call(remote_helpers.identity, context) == context
    blob = context.call(remote_helpers.identity, Blob(b'abc'))
    assert type(blob) is Blob and blob == b'abc' and repr(blob) == '[blob: 3 bytes]'
    secret = context.call(remote_helpers.identity, Secret('pw'))
    assert type(secret) is Secret and secret == 'pw' and repr(secret) == '[secret]'
    kw = context.call(remote_helpers.identity, Kwargs({'a': 1}))
    assert type(kw) is Kwargs and kw == {'a': 1}


def test_context_returned_is_bound_to_the_router(shared_router, context):
    other = shared_router.local(remote_name='another')
    back = context.call(remote_helpers.identity, other)
    assert isinstance(back, Context) and back == other
    assert back.name == 'another' and back.router is shared_router
    # The returned object is a usable context.
    assert back.call(os.getpid) == other.call(os.getpid)
    other.shutdown(wait=True)


class UserClass(object):
    pass


class Color(enum.IntEnum):
    RED = 1


REFUSED = [
    ({1, 2}, 'set', 'args[0]'),
    (frozenset(), 'frozenset', 'args[0]'),
    (UserClass(), 'test_serialization.UserClass', 'args[0]'),
    (lambda: 1, 'function', 'args[0]'),
    (collections.OrderedDict(), 'collections.OrderedDict', 'args[0]'),
    (Color.RED, 'test_serialization.Color', 'args[0]'),
    (1j, 'complex', 'args[0]'),
    (object, 'type', 'args[0]'),
    ([1, [2, {3}]], 'set', 'args[0][1][1]'),
    ({'k': {'j': set()}}, 'set', "args[0]['k']['j']"),
]


@pytest.mark.parametrize('value,type_name,where', REFUSED, ids=lambda v: repr(v)[:30])
def test_refused_at_the_caller(context, tmp_path, value, type_name, where):
    marker = tmp_path / 'ran'
    with pytest.raises(TypeError) as exc:
        context.call(remote_helpers.write_file, str(marker), value)
    # Positions count the user's arguments after the path argument.
    where = where.replace('args[0]', 'args[1]', 1)
    assert 'cannot send value of type %s at %s' % (type_name, where) in str(exc.value)
    assert not marker.exists(), 'the call must not have been sent'


def test_refused_in_kwargs_and_dict_keys(context):
    with pytest.raises(TypeError, match=r"type set at kwargs\['opt'\]\[2\]"):
        context.call(remote_helpers.echo, opt=[1, 2, {3}])
    with pytest.raises(TypeError, match=r'type frozenset at a key of args\[0\]'):
        context.call(remote_helpers.echo, {frozenset(): 1})


def test_refused_by_call_async_and_call_no_reply(context):
    with pytest.raises(TypeError, match='type set'):
        context.call_async(remote_helpers.echo, {1})
    with pytest.raises(TypeError, match='type set'):
        context.call_no_reply(remote_helpers.echo, {1})


def test_too_deep_is_refused(context):
    value = []
    for _ in range(150):
        value = [value]
    # TypeError like every value that cannot be sent (docs/getting-started.md).
    with pytest.raises(TypeError, match='nested more than'):
        context.call(remote_helpers.identity, value)


def test_remote_return_of_disallowed_type_is_call_error(context):
    with pytest.raises(CallError):
        context.call(remote_helpers.return_set)
    with pytest.raises(CallError):
        context.call(remote_helpers.return_object)
    # The context is still fine afterwards.
    assert context.call(remote_helpers.add, 1, 2) == 3


def test_big_payload(context):
    data = os.urandom(1 << 20)
    assert context.call(remote_helpers.identity, data) == data
    assert context.call(remote_helpers.identity, bytearray(data)) == bytearray(data)
