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

_wake_fds = None                # (r, w): wakes a reader waiting in _lead_until
_leading_slot = None            # the slot of that reader
_wake_lock = _thread.allocate_lock()


def _wake_pipe():
    global _wake_fds
    with _wake_lock:
        if _wake_fds is None:
            r, w = os.pipe()
            fds = (_private_dup(r), _private_dup(w))
            os.close(r)
            os.close(w)
            for fd in fds:
                os.set_blocking(fd, False)
            _wake_fds = fds
    return _wake_fds


_NO_ITEM = object()              # _step_down(): the slot had nothing


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

    def wait(self, slot, timeout=None, wakeable=False):
        """Return the next item delivered to `slot`, reading frames if nobody
        else does: the one wait of the agent (replies, the main thread's calls,
        Latch items). After `timeout` seconds (None: never) raise TimeoutError.
        `wakeable`: items also arrive from other threads (a Latch's put()), so
        a reader waiting here polls the wake pipe besides the parent's
        descriptor; replies and calls arrive only as frames and need not."""
        deadline = None if timeout is None else time.monotonic() + timeout
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
                self._sleep(slot, deadline, timeout)
                continue
            led = False
            try:
                if deadline is None and not wakeable:
                    # Appends happen under the lock, but reading the list's
                    # length without it is safe; the loop above re-checks.
                    while not slot.queue:
                        self._route(self.read_frame())
                else:
                    self._lead_until(slot, deadline, timeout)
                led = True
            finally:
                # Stepping down takes the item too: one lock, not two, per
                # call. Not after a TimeoutError: the item would be lost.
                item = self._step_down(slot if led else None)
            if item is not _NO_ITEM:
                return item

    def next_call(self):
        """wait(self.main) for the main thread's loop (_serve), as the fields
        (handle, src_id, reply_to, data), with its usual case inline: nobody
        else reads or waits, and the next frame is a call (or SHUTDOWN) from an
        ancestor. That frame goes straight to the caller, without a Message
        made, queued on the main slot and taken back; anything else takes the
        general path, in order."""
        slot = self.main
        lock = self._lock
        lock.acquire()
        if slot.queue or self._reading or self.router is not None or \
                self._sleeping:
            lock.release()
            return self._next_call_waiting()
        self._reading = True
        self._leader = _thread.get_ident()
        lock.release()
        item = None
        try:
            fields = self.read_fields()
            dst_id, src_id, auth_id, handle, reply_to, data = fields
            if (handle == CALL_FUNCTION or handle == SHUTDOWN) and \
                    dst_id == context_id and (
                        auth_id == parent_id or auth_id in parent_ids
                        or auth_id == context_id):
                item = (handle, src_id, reply_to, data)
            else:
                self._route(Message(*fields))  # queued on the main slot
        finally:
            # As _step_down(), inline: one call less per call.
            lock.acquire()
            self._reading = False
            self._leader = None
            if self.router is not None:
                if self.router.sleeping:
                    self._wake(self.router)
            elif self._sleeping:
                self._wake(self._sleeping[0])
            lock.release()
        if item is None:
            return self._next_call_waiting()
        return item

    def _next_call_waiting(self):
        msg = self.wait(self.main)
        return msg.handle, msg.src_id, msg.reply_to, msg.data

    def _sleep(self, slot, deadline, timeout):
        """Sleep until woken (with an item, or to take over reading) or until
        `deadline`: then TimeoutError, unless a wake-up raced with it."""
        if deadline is None:
            slot.wake.acquire()
            return
        if slot.wake.acquire(True, max(0.0, deadline - time.monotonic())):
            return
        with self._lock:
            timed_out = slot.sleeping
            if timed_out:
                slot.sleeping = False
                self._sleeping.remove(slot)
        if timed_out:
            raise TimeoutError('no message within %r seconds' % (timeout,))
        slot.wake.acquire()         # the wake-up that raced with the timeout

    def _lead_until(self, slot, deadline, timeout):
        """As the reader: read frames until `slot` has an item, waking on the
        wake pipe too (an item put by another thread) and at `deadline`."""
        global _leading_slot
        wake_r = _wake_pipe()[0]
        _leading_slot = slot
        try:
            poller = select.poll()
            poller.register(self._file.fileno(), select.POLLIN)
            poller.register(wake_r, select.POLLIN)
            while not slot.queue:
                if self._end == self._start:    # nothing buffered: wait
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
                    if self._file.fileno() not in ready:
                        continue
                self._route(self.read_frame())
        finally:
            _leading_slot = None

    def _step_down(self, slot=None):
        # Hand the reader role to a sleeping waiter, if any; once there is a
        # router thread, to it alone (the others never read any more). With
        # `slot`: also return its next item (_NO_ITEM if none).
        with self._lock:
            self._reading = False
            self._leader = None
            router = self.router
            if router is not None:
                if router.sleeping:
                    self._wake(router)
            elif self._sleeping:
                self._wake(self._sleeping[0])
            if slot is not None and slot.queue:
                return slot.queue.pop(0)
        return _NO_ITEM

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
        """Read one frame as a Message. Never returns on EOF or a framing
        error: the process exits, because the parent is gone or framing is
        lost."""
        return Message(*self.read_fields())

    def read_fields(self):
        """read_frame() without the Message: (dst_id, src_id, auth_id,
        handle, reply_to, data)."""
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
        if length <= _READ_SIZE:   # fits the buffer (its size)
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
        if _debug_fd is not None:
            _debug_log(DEBUG, 'received %r' % (
                Message(dst_id, src_id, auth_id, handle, reply_to, data),))
        return dst_id, src_id, auth_id, handle, reply_to, data


_inbox = None


