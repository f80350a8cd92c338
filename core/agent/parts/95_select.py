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


