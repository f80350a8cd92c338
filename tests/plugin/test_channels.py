"""Channels: Receiver, Sender, Channel, Select, Latch and router.add_handler,
on the controller and in contexts (docs/channels.md)."""
import os
import signal
import threading
import time

import pytest

import mitogen_native.core
import mitogen_native.select
from mitogen_native.core import (ChannelError, Latch, LatchError, Message, Receiver,
                                 Sender, StreamError, TimeoutError)
from mitogen_native.select import Select

import channel_helpers as ch
from helpers import run_script


# Upper bounds below only tell "woke up / timed out" from "hung": generous, so a
# loaded machine never fails them (the lower bounds are exact: a timeout never
# fires early).
HUNG = 30


def _wait_raises(fn, exc, bound=HUNG):
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        fn()
    elapsed = time.monotonic() - t0
    assert elapsed < bound, elapsed
    return info.value, elapsed


# ---------------------------------------------------------------- streaming

def test_remote_generator_streams_100000_items_in_order(router):
    ctx = router.local()
    recv = Receiver(router)
    t0 = time.monotonic()
    call = ctx.call_async(ch.stream, recv.to_sender(), 100000)
    items = [msg.unpickle() for msg in recv]   # ends at the Sender's close()
    elapsed = time.monotonic() - t0
    assert items == list(range(100000))
    assert call.get(timeout=30) == 100000
    print('\n100,000 items in %.2f s: %.0f items/s' % (elapsed, 100000 / elapsed))
    assert elapsed < 60


def test_message_fields_and_iteration_end(router):
    ctx = router.local()
    recv = Receiver(router)
    ctx.call(ch.send_few, recv.to_sender(), 'x', 2, close=True)
    msg = recv.get(timeout=10)
    assert isinstance(msg, Message)
    assert (msg.src_id, msg.handle, msg.is_dead) == (ctx.context_id, recv.handle, False)
    assert msg.unpickle() == ('x', 0)
    assert [m.unpickle() for m in recv] == [('x', 1)]
    with pytest.raises(ChannelError, match='Sender was explicitly closed'):
        recv.get(timeout=1)


def test_sender_to_own_receiver_and_channel(router):
    recv = Receiver(router)
    sender = recv.to_sender()
    assert sender.context.context_id == 0
    sender.send({'a': [1, 2]})
    assert recv.get(timeout=5).unpickle() == {'a': [1, 2]}
    chan = mitogen_native.core.Channel(router, router.myself(), recv.handle)
    chan.send('via channel')
    assert recv.get(timeout=5).unpickle() == 'via channel'
    chan.close()
    with pytest.raises(ChannelError):
        chan.get(timeout=5)
    with pytest.raises(ChannelError, match='Sender was explicitly closed'):
        recv.get(timeout=5)


# ---------------------------------------------------------------- select

def test_select_over_20_contexts_tells_which_receiver(router):
    contexts = [router.local(remote_name='sel%d' % i) for i in range(20)]
    receivers = [Receiver(router, respondent=c) for c in contexts]
    by_handle = dict((r.handle, (i, r)) for i, r in enumerate(receivers))
    for i, (c, r) in enumerate(zip(contexts, receivers)):
        c.call_no_reply(ch.send_few, r.to_sender(), i, 3)
    sel = Select(receivers, oneshot=False)
    got = {}
    for _ in range(60):
        msg = sel.get(timeout=30)
        i, r = by_handle[msg.receiver.handle]
        assert msg.receiver is r
        assert msg.src_id == contexts[i].context_id
        tag, n = msg.unpickle()
        assert tag == i
        got.setdefault(i, []).append(n)
    assert got == dict((i, [0, 1, 2]) for i in range(20))
    assert sel.empty()
    with pytest.raises(TimeoutError):
        sel.get(timeout=0.2)

    # Upstream's common use: one result per call_async(), in arrival order.
    pids = Select.all(c.call_async(os.getpid) for c in contexts)
    assert sorted(pids) == sorted(c.call(os.getpid) for c in contexts)
    seen = set()
    for msg in Select([c.call_async(os.getpid) for c in contexts[:5]]):
        seen.add(msg.receiver.context.context_id)
    assert seen == set(c.context_id for c in contexts[:5])


def test_nested_select_latch_and_membership_rules():
    latch_a, latch_b = Latch(), Latch()
    inner = Select([latch_b])
    outer = Select([latch_a, inner])
    assert outer.empty()
    with pytest.raises(mitogen_native.select.Error, match='owned'):
        Select([Latch()]).add(inner)   # inner belongs to outer
    with pytest.raises(mitogen_native.select.Error, match='cycle'):
        inner.add(outer)
    latch_b.put('b')
    assert outer.get(timeout=5) == 'b'
    latch_a.put('a')
    ev = outer.get_event(timeout=5)
    assert (ev.source, ev.data) == (latch_a, 'a')
    assert inner._select_owner is None   # oneshot: removed once it answered
    with pytest.raises(mitogen_native.select.Error, match='empty'):
        outer.get(timeout=0.1)          # oneshot: both members answered


def test_select_close_wakes_getter():
    sel = Select([Latch()])
    threading.Timer(0.2, sel.close).start()
    _wait_raises(lambda: sel.get(timeout=10), LatchError)


# ---------------------------------------------------------------- closing

def test_close_from_another_thread_wakes_blocked_get(router):
    recv = Receiver(router)
    threading.Timer(0.3, recv.close).start()
    e, elapsed = _wait_raises(lambda: recv.get(), ChannelError)
    assert elapsed >= 0.25
    assert 'the Receiver has been closed' in str(e)
    with pytest.raises(ChannelError):   # and stays closed
        recv.get(timeout=1)


def test_remote_close_wakes_blocked_get(router):
    ctx = router.local()
    recv = Receiver(router)
    result = {}

    def reader():
        try:
            result['items'] = [m.unpickle() for m in recv]
            recv.get(timeout=5)
        except ChannelError as e:
            result['error'] = str(e)
    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.2)
    ctx.call(ch.send_few, recv.to_sender(), 'k', 2, close=True)
    t.join(5)
    assert not t.is_alive()
    assert result == {'items': [('k', 0), ('k', 1)], 'error': 'Sender was explicitly closed'}


@pytest.mark.parametrize('with_respondent', [False, True])
def test_killed_context_wakes_blocked_get(router, with_respondent):
    ctx = router.local()
    pid = ctx.call(os.getpid)
    recv = Receiver(router, respondent=ctx if with_respondent else None)
    ctx.call_async(ch.stream_forever, recv.to_sender())
    assert recv.get(timeout=10).unpickle() == 0
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ChannelError) as info:
        while True:
            recv.get(timeout=10)   # items already queued, then the error
    assert time.monotonic() - t0 < HUNG
    assert 'disconnected' in str(info.value)


# ---------------------------------------------------------------- timeouts

def test_get_timeout_and_nonblocking(router):
    recv = Receiver(router)
    e, elapsed = _wait_raises(lambda: recv.get(timeout=0.2), TimeoutError)
    assert elapsed >= 0.18
    _wait_raises(lambda: recv.get(block=False), TimeoutError)
    assert recv.empty() and recv.size() == 0


# ---------------------------------------------------------------- trust

def test_only_contexts_given_the_sender_may_send(router):
    good, bad = router.local(remote_name='good'), router.local(remote_name='bad')
    recv = Receiver(router)
    good.call(ch.send_few, recv.to_sender(), 'good', 1)
    assert bad.call(ch.send_by_handle, recv.handle, 'forged') is True
    assert recv.get(timeout=5).unpickle() == ('good', 0)
    with pytest.raises(TimeoutError):
        recv.get(timeout=0.5)          # the forged message was dropped
    recv.grant(bad)                     # explicit permission
    bad.call(ch.send_by_handle, recv.handle, 'allowed now')
    assert recv.get(timeout=5).unpickle() == 'allowed now'


def test_refused_payload_fails_that_message_only(router):
    hostile, honest = router.local(remote_name='hostile'), router.local(remote_name='honest')
    recv = Receiver(router)
    sender = recv.to_sender()
    hostile.call(ch.send_few, sender, 'h', 0)   # hands `hostile` the Sender
    hostile.call(ch.send_refused_payload, recv.handle)
    honest.call(ch.send_few, sender, 'ok', 1)
    bad = recv.get(timeout=5)
    assert bad.src_id == hostile.context_id
    with pytest.raises(StreamError, match='os.system|posix.system'):
        bad.unpickle()
    assert recv.get(timeout=5).unpickle() == ('ok', 0)   # the receiver still works
    # Breaking the codec rules got the hostile context disconnected.
    with pytest.raises(ChannelError):
        hostile.call(os.getpid)


# ---------------------------------------------------------------- latch

def test_latch_put_get_timeout_close():
    latch = Latch()
    for i in range(3):
        latch.put(i)
    assert latch.size() == 3 and not latch.empty()
    assert [latch.get() for _ in range(3)] == [0, 1, 2]
    _, elapsed = _wait_raises(lambda: latch.get(timeout=0.2), TimeoutError)
    assert elapsed >= 0.18
    _wait_raises(lambda: latch.get(block=False), TimeoutError)

    got = []
    producers = [threading.Thread(target=lambda k=k: [latch.put((k, i)) for i in range(100)])
                 for k in range(4)]
    for t in producers:
        t.start()
    for _ in range(400):
        got.append(latch.get(timeout=10))
    for t in producers:
        t.join()
    assert sorted(got) == sorted((k, i) for k in range(4) for i in range(100))
    for k in range(4):   # each producer's items stay in order
        assert [i for kk, i in got if kk == k] == list(range(100))

    threading.Timer(0.2, latch.close).start()
    _wait_raises(lambda: latch.get(), LatchError)
    with pytest.raises(LatchError):
        latch.put(1)


# ---------------------------------------------------------------- add_handler

def test_add_handler_runs_on_the_handler_thread(router):
    ctx = router.local()
    calls = []
    done = threading.Event()

    def fn(msg):
        calls.append((threading.current_thread().name, msg.is_dead,
                      None if msg.is_dead else msg.unpickle()))
        if len(calls) == 4:
            done.set()
    handle = router.add_handler(fn)
    sender = Sender(router.myself(), handle)
    ctx.call(ch.send_few, sender, 'h', 3, close=True)
    assert done.wait(10)
    assert [c[0] for c in calls] == ['mitogen_native.handlers'] * 4
    assert [c[1:] for c in calls] == [(False, ('h', 0)), (False, ('h', 1)),
                                      (False, ('h', 2)), (True, None)]
    with pytest.raises(KeyError):
        router.del_handler(handle)     # the dead message removed it


def test_add_handler_persist_false_del_handler_and_overwrite(router):
    ctx = router.local()
    seen = []
    once = router.add_handler(seen.append, persist=False)
    ctx.call(ch.send_few, Sender(router.myself(), once), 'o', 3)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert [m.unpickle() for m in seen] == [('o', 0)]

    kept = router.add_handler(seen.append)
    with pytest.raises(mitogen_native.core.Error, match='already has a handler'):
        router.add_handler(seen.append, handle=kept)
    router.del_handler(kept)
    with pytest.raises(KeyError):
        router.del_handler(kept)


def test_handler_gets_dead_message_when_context_dies(router):
    ctx = router.local()
    pid = ctx.call(os.getpid)
    dead = threading.Event()
    handle = router.add_handler(lambda msg: msg.is_dead and dead.set(), respondent=ctx)
    ctx.call(ch.send_few, Sender(router.myself(), handle), 'x', 1)
    os.kill(pid, signal.SIGKILL)
    assert dead.wait(HUNG)


# ---------------------------------------------------------------- child side

def test_child_receiver_read_by_a_second_call(router):
    ctx = router.local()
    sender = ctx.call(ch.make_receiver)
    assert isinstance(sender, Sender) and sender.context.context_id == ctx.context_id
    for i in range(100):
        sender.send(i)
    sender.close()
    items, reason = ctx.call(ch.drain)
    assert items == [(0, i) for i in range(100)]
    assert reason == 'Sender was explicitly closed'


def test_child_receiver_read_by_a_thread(router):
    ctx = router.local()
    sender = ctx.call(ch.make_receiver)
    ctx.call(ch.start_reader_thread)
    for i in range(50):
        sender.send({'i': i})
    sender.close()
    finished, results = ctx.call(ch.reader_results)
    assert finished and results == [{'i': i} for i in range(50)]


def test_child_select_and_latch(router):
    ctx = router.local()
    senders = ctx.call(ch.child_select, 3, 4)
    for k in range(4):
        for i, s in enumerate(senders):
            s.send((i, k))
    out, modname = ctx.call(ch.select_drain, 12)
    assert modname == 'mitogen.select'
    assert sorted(out) == sorted((i, (i, k)) for i in range(3) for k in range(4))
    value, waited = ctx.call(ch.latch_wake_from_thread, 0.2)
    assert value == 'from thread' and 0.15 < waited < HUNG
    waited = ctx.call(ch.latch_timeout, 0.2)
    assert waited is not None and 0.18 <= waited < HUNG
    waited = ctx.call(ch.receiver_timeout, 0.2)
    assert waited is not None and 0.18 <= waited < HUNG


def test_ctrl_c_interrupts_blocked_receiver_and_select(router):
    recv = Receiver(router)
    for wait in (lambda: recv.get(), lambda: Select([recv]).get()):
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        _wait_raises(wait, KeyboardInterrupt)
        timer.join()


HANDLER_AT_EXIT = r'''
import os, threading
import mitogen_native, mitogen_native.master
router = mitogen_native.master.Router()
ctx = router.local()
router.add_handler(lambda msg: None)
ctx.call(os.getpid)
mitogen_native._at_exit()       # what atexit runs
alive = [t.name for t in threading.enumerate() if t.name == 'mitogen_native.handlers']
print('alive:', alive)
'''


def test_the_handler_thread_is_gone_before_the_interpreter_finalizes():
    # A daemon thread still inside the extension at finalization is killed by
    # CPython as it retakes the GIL, through a noexcept destructor:
    # "terminate called without an active exception" and an abort.
    proc = run_script(HANDLER_AT_EXIT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert 'alive: []' in proc.stdout
    assert 'terminate' not in proc.stderr
