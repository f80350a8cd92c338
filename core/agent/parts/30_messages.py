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
_debug_fd = None        # $TMPDIR/mitogen-<uid>/mitogen.<pid>.log when config['debug']


def _send(dst_id, handle, data, reply_to=0):
    """Write one frame to the parent (or, for a descendant started via this
    context, to the child leading there). Safe from any thread. If the parent
    is gone the write fails, and there is nothing left to do but exit."""
    if _routes:   # via= section: a descendant is reached through a child
        child = _routes.get(dst_id)
        if child is not None:
            child.send(dst_id, handle, data, reply_to)
            return
    fd = _out_fd
    if fd is None:
        return
    size = len(data)
    header = _HEADER.pack(HEADER_MAGIC, dst_id, context_id, context_id,
                          handle, reply_to, size)
    # While exiting, never wait long for a writer that may be stuck.
    if _exiting:
        if not _write_lock.acquire(True, 0.5):
            os._exit(0)
    else:
        _write_lock.acquire()
    parent_gone = False
    try:
        if size < _READ_SIZE:
            buf = header + data
            n = os.write(fd, buf)
            if n != size + _HEADER_LEN:
                _write_rest(fd, buf, n)
        else:
            # Large payload: avoid copying it just to prepend 26 bytes.
            n = os.writev(fd, [header, data])
            if n < _HEADER_LEN:
                _write_rest(fd, header, n)
                n = _HEADER_LEN
            _write_rest(fd, data, n - _HEADER_LEN)
    except OSError:
        parent_gone = True   # EPIPE, ECONNRESET, ...
    finally:
        _write_lock.release()
    if parent_gone:
        # Leave as on end of input: unfinished received files are removed.
        _exit(0, 'parent gone: a write failed')
    if _debug_fd is not None:
        _debug_log(DEBUG, 'sent handle=%d reply_to=%d to %d (%d bytes)'
                   % (handle, reply_to, dst_id, len(data)))


def _write_rest(fd, buf, offset):
    view = memoryview(buf)[offset:]
    while view:
        view = view[os.write(fd, view):]


def _private_tmp_dir():
    """$TMPDIR/mitogen-<euid> (default /tmp): created 0700 if missing, and
    refused unless it is a real directory of ours that nobody else may
    write to, so that no other user can plant or read our logs."""
    import stat
    base = os.environ.get('TMPDIR') or '/tmp'
    path = os.path.join(base, 'mitogen-%d' % os.geteuid())
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or \
            st.st_mode & 0o077:
        raise OSError(1, '%s is not a private directory of uid %d'
                      % (path, os.geteuid()))
    return path


def _open_debug_log():
    """A fresh mitogen.<pid>.log in _private_tmp_dir(), created with O_EXCL
    (a leftover of an earlier process with our pid is replaced)."""
    path = os.path.join(_private_tmp_dir(), 'mitogen.%d.log' % os.getpid())
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND |
             os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, 0o600)


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
    data = ('%s\0%d\0%s' % (name, levelno, text)).encode('utf-8', 'replace')
    _send(0, FORWARD_LOG, data)
    return len(data)


class _Pacer(object):
    """What this context forwards as output and `logging` records stays within
    half the master's per-context budget (log_forwarder.hpp: 2000 records and
    8 MiB per second, bursts of 10000 and 32 MiB), so the master never drops
    what well-behaved code prints: a writer beyond it waits (the output pipe
    fills and print() blocks; a logging call sleeps) instead. A token bucket
    that may go into debt by one record."""
    RECORDS, RECORD_BURST = 1000.0, 5000.0
    BYTES, BYTE_BURST = 4.0 * 1024 * 1024, 16.0 * 1024 * 1024

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._records, self._bytes = self.RECORD_BURST, self.BYTE_BURST
        self._t = time.monotonic()

    def delay(self):
        """Seconds to wait before the next record may go (0: now)."""
        with self._lock:
            now = time.monotonic()
            dt, self._t = now - self._t, now
            self._records = min(self.RECORD_BURST, self._records + dt * self.RECORDS)
            self._bytes = min(self.BYTE_BURST, self._bytes + dt * self.BYTES)
            return max(0.0, (1.0 - self._records) / self.RECORDS,
                       -self._bytes / self.BYTES)

    def spent(self, nbytes):
        with self._lock:
            self._records -= 1
            self._bytes -= nbytes

    def forward(self, name, levelno, text):
        """Forward one record, first waiting for the budget (backpressure on
        the calling thread)."""
        wait = self.delay()
        while wait > 0:
            time.sleep(min(wait, 0.1))
            wait = self.delay()
        self.spent(_forward_log(name, levelno, text))


_pacer = _Pacer()


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


# Refusals (docs/security.md, "Who may make a context act").

def _is_ancestor(ident):
    """True if context `ident` is us or one of our ancestors: the contexts
    whose messages carry authority over us."""
    return ident == parent_id or ident in parent_ids or ident == context_id


_complained = set()     # senders already named in a refusal warning


def _complain(sender, fmt, *args):
    """Log a refusal at WARNING, once per sender (then DEBUG only)."""
    if sender in _complained or len(_complained) >= 4096:
        if _debug_fd is not None:
            _debug_log(DEBUG, fmt % args)
        return
    _complained.add(sender)
    _log(WARNING, fmt + ' (logged once per sender)', *args)


def _refuse_foreign(msg):
    """A message to one of our reply handles from a context it was not
    asked of."""
    _inbox._refuse(msg, 'handle %d awaits a reply from another context'
                   % msg.handle)


