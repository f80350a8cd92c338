"""Channels on the controller: Message, Receiver, Channel, Latch, and the thread
that runs ``Router.add_handler()`` callbacks. Re-exported by
:mod:`mitogen_native.core` under upstream's names; see docs/channels.md.

The broker thread (C++) never runs Python: it queues messages in a C++ receiver
and, for Select, puts a token in a C++ queue. Python runs only in the threads
that call ``get()`` and in the handler thread.
"""
import logging
import threading
import weakref
import time

from mitogen_native import _native
from mitogen_native import _wire

LOG = logging.getLogger('mitogen')

IS_DEAD = 999


class Message(object):
    """One message received on a channel. ``unpickle()`` decodes :attr:`data`
    with the restricted decoder (the sender is untrusted): a payload it refuses
    raises :class:`StreamError` and disconnects the sender, as for call replies;
    the receiver keeps working. :attr:`receiver` is set by Select."""
    __slots__ = ('dst_id', 'src_id', 'auth_id', 'handle', 'reply_to', 'data',
                 'router', 'receiver', '_value')

    _unset = object()

    def __init__(self, router=None, dst_id=None, src_id=None, auth_id=None,
                 handle=None, reply_to=None, data=b''):
        self.router = router
        self.dst_id = dst_id
        self.src_id = src_id
        self.auth_id = auth_id
        self.handle = handle
        self.reply_to = reply_to
        self.data = data
        self.receiver = None
        self._value = Message._unset

    @classmethod
    def pickled(cls, obj, **kwargs):
        """A message carrying `obj`, for :meth:`Context.send` (upstream's
        Message.pickled). `kwargs` set ``handle``, ``reply_to``, ... The value
        is checked and encoded when it is sent."""
        msg = cls(**kwargs)
        msg._value = obj
        return msg

    @property
    def is_dead(self):
        """True for the message that ends a channel."""
        return self.reply_to == IS_DEAD

    def _throw_dead(self):
        raise _wire.ChannelError(self.data.decode('utf-8', 'replace')
                                or 'Channel closed by remote end.')

    def unpickle(self, throw=True, throw_dead=True):
        """The value sent. Raises :class:`ChannelError` for a dead message
        (unless `throw_dead` is false: then the dead marker is returned), the
        :class:`CallError` sent (unless `throw` is false)."""
        if self.is_dead:
            if throw_dead:
                self._throw_dead()
            return _wire._DEAD()
        value = self._value
        if value is Message._unset:
            value = self._value = _native._unpickle(self.router, self.src_id, self.data)
        if throw and isinstance(value, _wire.CallError):
            raise value
        return value

    def __repr__(self):
        return 'Message(%r->%r, handle=%r, reply_to=%r, %d bytes)' % (
            self.src_id, self.dst_id, self.handle, self.reply_to, len(self.data))


class _CallResult(object):
    """What Select yields for a call_async() receiver: a Message-like object
    whose unpickle() is the call's result."""
    __slots__ = ('receiver', 'src_id', 'auth_id')

    def __init__(self, receiver):
        self.receiver = receiver
        self.src_id = self.auth_id = receiver.context.context_id

    is_dead = False

    def unpickle(self, throw=True, throw_dead=True):
        try:
            return self.receiver.get()
        except _wire.CallError as e:
            if throw:
                raise
            return e

    def __repr__(self):
        return '_CallResult(%r)' % (self.receiver.context,)


class Receiver(object):
    """A queue of messages sent to one handle of this program, as upstream's
    ``mitogen.core.Receiver``.

    :param router: the Router to register on.
    :param handle: an explicit handle (default: a fresh one).
    :param persist: False: unregister after the first message.
    :param respondent: a Context: only it may send here, and its disconnection
        ends the channel. Without one, only the contexts this program handed
        :meth:`to_sender` to may send, and the channel ends when the last of
        them disconnects (docs/channels.md, "Who may send").
    :param policy: ``policy(msg, stream)`` -> bool; when given, any context may
        send and the policy decides, in the thread calling :meth:`get`
        (``stream`` is always None). Refused messages are dropped and logged.
    :param overwrite: replace a handler already registered on `handle`.
    """
    #: Set by Select (upstream's attribute; here only for compatibility checks).
    notify = None
    closed_msg = 'the Receiver has been closed'

    def __init__(self, router, handle=None, persist=True, respondent=None,
                 policy=None, overwrite=False):
        self.router = router
        self.respondent = respondent
        self.policy = policy
        respondent_id = None
        if respondent is not None:
            respondent_id = getattr(respondent, 'context_id', respondent)
        try:
            self._rx = _native._ChannelReceiver(
                router, int(handle or 0), bool(persist), respondent_id,
                policy is not None, bool(overwrite))
        except _wire.Error:
            raise
        self.handle = self._rx.handle

    def __repr__(self):
        return 'Receiver(%r, %r)' % (self.router, self.handle)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def to_sender(self):
        """A :class:`Sender` for this receiver, to pass to a context."""
        return _wire.Sender(self.router.myself(), self.handle)

    def grant(self, context):
        """Allow `context` to send here without handing it the Sender through a
        call (e.g. it learnt the handle some other way)."""
        self._rx.grant(getattr(context, 'context_id', context))

    def close(self):
        """Unregister the handle; every thread blocked in :meth:`get` (and every
        later get()) raises ChannelError('the Receiver has been closed')."""
        self._rx.close(self.closed_msg)

    def size(self):
        """Messages queued now."""
        return self._rx.size()

    def empty(self):
        return self._rx.size() == 0

    def get(self, timeout=None, block=True, throw_dead=True):
        """The next :class:`Message`.

        :raises ChannelError: the channel ended (closed here, closed by the
            sender, or the sending context disconnected).
        :raises TimeoutError: nothing arrived within `timeout` seconds (or at
            once, with ``block=False``).
        """
        deadline = None
        while True:
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
            t = self._rx.get(timeout, block)
            msg = Message(self.router, *t)
            if msg.is_dead:
                if throw_dead:
                    msg._throw_dead()
                return msg
            if self.policy is None:
                return msg
            try:
                ok = self.policy(msg, None)
            except Exception:
                LOG.exception('%r: policy %r failed', self, self.policy)
                ok = False
            if ok:
                return msg
            LOG.warning('%r: policy refused %r; dropped', self, msg)
            if timeout is not None and deadline is None:
                deadline = time.monotonic() + timeout

    def __iter__(self):
        """Yield messages until the channel ends."""
        while True:
            try:
                msg = self.get()
            except _wire.ChannelError:
                return
            yield msg


class Channel(_wire.Sender, Receiver):
    """A Sender and a Receiver in one object (upstream's deprecated sugar):
    sends go to (`context`, `dst_handle`), gets come from this program's
    `handle`. The context is granted the receiving end."""
    def __init__(self, router, context, dst_handle, handle=None):
        _wire.Sender.__init__(self, context, dst_handle)
        Receiver.__init__(self, router, handle)
        if context.context_id != router.context_id:
            self.grant(context)

    def close(self):
        Receiver.close(self)
        _wire.Sender.close(self)

    def __repr__(self):
        return 'Channel(%s, %s)' % (_wire.Sender.__repr__(self), Receiver.__repr__(self))


class Latch(object):
    """A thread-safe queue between threads of this program (upstream's
    ``mitogen.core.Latch``): put() from any thread, get() waits. Closing it
    wakes every waiter with :class:`LatchError`."""
    #: Set by Select: called as notify(latch) after each put().
    notify = None

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._queue = []
        self.closed = False

    def close(self):
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def size(self):
        with self._cond:
            if self.closed:
                raise _wire.LatchError()
            return len(self._queue)

    def empty(self):
        return self.size() == 0

    def put(self, obj=None):
        with self._cond:
            if self.closed:
                raise _wire.LatchError()
            self._queue.append(obj)
            self._cond.notify()
        notify = self.notify
        if notify is not None:
            notify(self)

    def get(self, timeout=None, block=True):
        """The oldest item. :raises LatchError: closed; :raises TimeoutError:
        nothing within `timeout` seconds (at once with ``block=False``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self.closed:
                    raise _wire.LatchError()
                if self._queue:
                    return self._queue.pop(0)
                if not block:
                    raise _wire.TimeoutError()
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _wire.TimeoutError()
                    self._cond.wait(left)

    def __repr__(self):
        return 'Latch(%#x, size=%d)' % (id(self), len(self._queue))


_all_handlers = weakref.WeakSet()


def _stop_handlers():
    for handlers in list(_all_handlers):
        handlers.stop()


class _Handlers(object):
    """``Router.add_handler()``: each handler is a Receiver; one daemon thread
    per router waits on all of them (one C++ token queue, as Select) and calls
    ``fn(msg)`` for each message, dead ones included. Handlers therefore run
    in that thread, never on the broker thread: a slow handler delays the other
    handlers of its router, not I/O."""

    def __init__(self, router):
        self._router = router
        self._lock = threading.Lock()
        self._queue = _native._SelectQueue()
        _all_handlers.add(self)
        self._by_token = {}      # token -> (receiver, fn, persist)
        self._by_handle = {}     # handle -> token
        self._next = 1
        self._thread = None

    def add(self, fn, handle, persist, policy, respondent, overwrite):
        recv = Receiver(self._router, handle=handle, persist=persist,
                        respondent=respondent, policy=policy, overwrite=overwrite)
        with self._lock:
            token = self._next
            self._next += 1
            self._by_token[token] = (recv, fn, persist)
            self._by_handle[recv.handle] = token
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, daemon=True,
                    name='mitogen_native.handlers')
                self._thread.start()
        self._queue.watch_receiver(recv._rx, token)
        return recv.handle

    def remove(self, handle):
        with self._lock:
            token = self._by_handle.pop(handle, None)
            entry = self._by_token.pop(token, None)
        if entry is None:
            return False
        self._queue.unwatch_receiver(entry[0]._rx)
        entry[0].close()
        return True

    def stop(self, timeout=2.0):
        """End the handler thread (at exit, after the brokers shut down). A
        daemon thread still waiting in C++ when the interpreter finalizes would
        be killed by CPython as it takes the GIL back (pthread_exit through a
        noexcept destructor: std::terminate), so it must be gone by then."""
        self._queue.close()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self):
        while True:
            try:
                token = self._queue.get(None, True)
            except _wire.TimeoutError:
                continue
            if token is None:
                return
            with self._lock:
                entry = self._by_token.get(token)
            if entry is None:
                continue
            recv, fn, persist = entry
            try:
                msg = recv.get(block=False, throw_dead=False)
            except _wire.TimeoutError:
                continue
            if not persist or msg.is_dead:
                self.remove(recv.handle)
            try:
                fn(msg)
            except Exception:
                LOG.exception('handler %r for handle %d failed', fn, recv.handle)
