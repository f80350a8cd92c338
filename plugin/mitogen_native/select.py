"""Waiting on several receivers at once: upstream's ``mitogen.select``.

A :class:`Select` holds channel Receivers, ``call_async()`` receivers, Latches
and other Selects. Each member puts a token in the Select's C++ queue when it
has something (receivers do so on the broker thread, without Python); get()
waits on that queue with the GIL released, then takes the item from the member
that put the token. See docs/channels.md.
"""
import time

from mitogen_native import _native
from mitogen_native import core
from mitogen_native._channels import Receiver, Latch, _CallResult


class Error(core.Error):
    pass


class Event(object):
    """What get_event() returns: `source` (the member) and `data` (its item)."""
    source = None
    data = None


class Select(object):
    """Wait on many receivers; see upstream's ``mitogen.select.Select``.

    ``get()`` returns the next item from whichever member has one: a
    :class:`mitogen_native.core.Message` for channel receivers (with
    :attr:`~Message.receiver` set to the member), a Message-like object whose
    ``unpickle()`` returns the call's result for ``call_async()`` receivers,
    the item put for a Latch. With ``oneshot=True`` (the default) a member is
    removed after it produced one item, so ``for msg in Select(recvs)`` ends
    once each receiver answered once.
    """
    notify = None   # upstream's attribute; membership is tracked by _owner

    def __init__(self, receivers=(), oneshot=True):
        self._receivers = []
        self._oneshot = oneshot
        self._queue = _native._SelectQueue()
        self._tokens = {}
        self._next = 1
        self._owner = None
        for recv in receivers:
            self.add(recv)

    @classmethod
    def all(cls, receivers):
        """The unpickled item of each receiver, in the order they arrive."""
        return list(msg.unpickle() for msg in cls(receivers))

    def __bool__(self):
        return bool(self._receivers)

    __nonzero__ = __bool__

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

    loop_msg = 'Adding this Select instance would create a Select cycle'

    def _check_no_loop(self, recv):
        if recv is self:
            raise Error(self.loop_msg)
        for member in self._receivers:
            if member is recv:
                raise Error(self.loop_msg)
            if isinstance(member, Select):
                member._check_no_loop(recv)

    owned_msg = 'Cannot add: Receiver is already owned by another Select'

    def _token_of(self, recv):
        for token, member in self._tokens.items():
            if member is recv:
                return token
        return None

    def add(self, recv):
        """Add a Receiver, call_async() receiver, Latch or Select.

        :raises mitogen_native.select.Error: `recv` is in a Select already, or
            adding it would create a cycle.
        """
        if isinstance(recv, Select):
            recv._check_no_loop(self)
        if getattr(recv, '_select_owner', None) is not None or \
                (isinstance(recv, Latch) and recv.notify is not None):
            raise Error(self.owned_msg)
        token = self._next
        self._next += 1
        try:
            recv._select_owner = self
        except AttributeError:
            raise TypeError('cannot add %r to a Select' % (recv,))
        self._tokens[token] = recv
        self._receivers.append(recv)
        if isinstance(recv, Select):
            self._queue.watch_queue(recv._queue, token)
        elif isinstance(recv, Receiver):
            self._queue.watch_receiver(recv._rx, token)
        elif isinstance(recv, core.CallReceiver):
            self._queue.watch_receiver(recv, token)
        elif isinstance(recv, Latch):
            queue = self._queue
            recv.notify = lambda _latch: queue.put(token)
            for _ in range(recv.size()):
                queue.put(token)
        else:
            self._receivers.remove(recv)
            del self._tokens[token]
            recv._select_owner = None
            raise TypeError('cannot add %r to a Select' % (recv,))

    not_present_msg = 'Instance is not a member of this Select'

    def remove(self, recv):
        """Remove a member. An item it already announced may still be returned."""
        token = self._token_of(recv)
        if token is None:
            raise Error(self.not_present_msg)
        del self._tokens[token]
        self._receivers.remove(recv)
        recv._select_owner = None
        if isinstance(recv, Select):
            self._queue.unwatch_queue(recv._queue)
        elif isinstance(recv, Receiver):
            self._queue.unwatch_receiver(recv._rx)
        elif isinstance(recv, core.CallReceiver):
            self._queue.unwatch_receiver(recv)
        elif isinstance(recv, Latch):
            recv.notify = None

    def close(self):
        """Remove every member and wake get()ers with LatchError."""
        for recv in self._receivers[:]:
            self.remove(recv)
        self._queue.close()

    def size(self):
        return sum(m.size() for m in self._receivers
                   if not isinstance(m, core.CallReceiver)) + sum(
            1 for m in self._receivers
            if isinstance(m, core.CallReceiver) and m.ready())

    def empty(self):
        """True if no member has announced an item."""
        return self._queue.size() == 0

    empty_msg = 'Cannot get(), Select instance is empty'

    def get(self, timeout=None, block=True):
        """The next item (see the class docstring)."""
        return self.get_event(timeout, block).data

    def get_event(self, timeout=None, block=True):
        """The next :class:`Event`.

        :raises TimeoutError: nothing within `timeout` seconds.
        :raises LatchError: the Select was closed.
        :raises ChannelError: the member's channel ended (a dead message).
        :raises mitogen_native.select.Error: the Select has no members.
        """
        if not self._receivers:
            raise Error(self.empty_msg)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            token = self._queue.get(left, block)
            if token is None:
                raise core.LatchError('the Select has been closed')
            recv = self._tokens.get(token)
            if recv is None:
                continue   # removed since it announced an item
            try:
                if isinstance(recv, Select):
                    event = recv.get_event(block=False)
                else:
                    event = Event()
                    event.source = recv
                    if isinstance(recv, core.CallReceiver):
                        event.data = _CallResult(recv)
                    else:
                        event.data = recv.get(block=False)
            except core.TimeoutError:
                continue
            except core.ChannelError:
                if self._oneshot:
                    self.remove(recv)
                raise
            if self._oneshot:
                self.remove(recv)
            if isinstance(recv, Receiver):
                event.data.receiver = recv
            return event
