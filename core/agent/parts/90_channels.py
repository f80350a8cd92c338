

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
# A Latch waits with _Inbox.wait(timeout, wakeable=True): the same reader
# protocol as replies and calls, plus a timeout and the wake pipe.

class LatchError(Error):
    """The Latch was closed."""


_CLOSED = object()              # delivered to a Latch's waiters by close()
_chan_lock = _thread.allocate_lock()    # slots' state before bootstrap (unit tests)


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
    else does (_Inbox.wait). Raises TimeoutError after `timeout` seconds."""
    inbox = _inbox
    if inbox is not None:
        return inbox.wait(slot, timeout, wakeable=True)
    # Not bootstrapped (unit tests): only other threads deliver.
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _chan_lock:
            if slot.queue:
                return slot.queue.pop(0)
            slot.sleeping = True
        if deadline is None:
            slot.wake.acquire()
        elif not slot.wake.acquire(True, max(0.0, deadline - time.monotonic())):
            with _chan_lock:
                timed_out = slot.sleeping
                slot.sleeping = False
            if timed_out:
                raise TimeoutError('no message within %r seconds' % (timeout,))
            slot.wake.acquire()     # the wake-up that raced with the timeout


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


