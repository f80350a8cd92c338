# ---------------------------------------------------------------------------
# File transfer (docs/files.md; the master's side is
# core/src/services/file_service.cpp). The master calls _file_receive() to
# push a file here and _file_send() to pull one; either runs on the main
# thread for the whole transfer and streams raw chunks on a reply handle of
# its own, with credit-based flow control: the receiver acknowledges the
# bytes it has written (an 8-byte big-endian count), and the sender keeps at
# most `window` bytes unacknowledged. A received file is written to a
# temporary name in the destination directory and renamed into place only
# once complete; on any failure the temporary file is removed and the
# destination is left as it was.

_FILE_ACK = Struct('>Q')          # bytes written so far
_FILE_HEADER = Struct('>QL')      # size, st_mode & 0o7777 (first message of a fetch)
_file_temps = set()               # temporary files to remove if we exit now


def _file_cleanup():
    """Remove unfinished temporary files (the process is exiting)."""
    for path in list(_file_temps):
        try:
            os.unlink(path)
        except OSError:
            pass
    _file_temps.clear()


_file_pipes_grown = False


def _file_grow_pipes():
    """Once: enlarge the protocol pipes (if they are pipes) to 1 MiB, the
    unprivileged maximum, so a chunk moves in a few system calls instead of
    sixteen 64 KiB wake-ups. Best effort."""
    global _file_pipes_grown
    if _file_pipes_grown:
        return
    _file_pipes_grown = True
    for fd in (_inbox._file.fileno(), _out_fd):
        try:
            fcntl.fcntl(fd, 1031, 1 << 20)     # F_SETPIPE_SZ
        except (OSError, TypeError):
            pass


def _file_check_sender(obj, what):
    if not (isinstance(obj, Sender) and type(obj.dst_handle) is int and
            obj.dst_handle >= FIRST_DYNAMIC_HANDLE):
        raise StreamError('bad %s: %r' % (what, obj))
    return obj.context.context_id, obj.dst_handle


def _file_id(value, kind):
    """A uid or gid from a name or a number; -1 for None (leave as is)."""
    if value is None:
        return -1
    if type(value) is int:
        return value
    if type(value) is str:
        if value.isdigit():
            return int(value)
        try:
            if kind == 'user':
                import pwd
                return pwd.getpwnam(value).pw_uid
            import grp
            return grp.getgrnam(value).gr_gid
        except KeyError:
            pass
    # An OSError with its errno: the controller's FileError carries it (EINVAL).
    raise OSError(22, 'unknown %s %r' % (kind, value))


def _file_temp(path):
    """Create a new, empty temporary file next to `path`, mode 0600."""
    directory, name = os.path.split(path)
    if not name:
        raise IsADirectoryError(21, 'Is a directory', path)
    for _ in range(100):
        tmp = os.path.join(directory, '.%s.%s.tmp' % (
            name[:200], os.urandom(6).hex()))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                         os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        _file_temps.add(tmp)
        return fd, tmp
    raise FileExistsError(17, 'no free temporary name', path)


def _file_write(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _file_receive(path, size, mode, owner, group, ack_to, ack_bytes):
    """Receive `size` bytes from the master into `path` (see the top of this
    section). Returns the number of bytes written."""
    if not (type(path) is str and path and type(size) is int and size >= 0
            and type(mode) is int and 0 <= mode <= 0o7777 and
            type(ack_bytes) is int and ack_bytes > 0):
        raise StreamError('bad _file_receive arguments')
    peer, ack_handle = _file_check_sender(ack_to, 'ack_to')
    _file_grow_pipes()
    uid, gid = _file_id(owner, 'user'), _file_id(group, 'group')
    handle, slot = _inbox.open_slot(peer)
    fd = tmp = None
    done = announced = peer_gone = False
    try:
        try:
            fd, tmp = _file_temp(path)
            # Our data handle travels as reply_to of the first acknowledgement.
            _send(peer, ack_handle, _FILE_ACK.pack(0), reply_to=handle)
            announced = True
            got = acked = 0
            while got < size:
                msg = _inbox.wait(slot)
                if msg.is_dead:
                    peer_gone = True
                    raise ChannelError('the sender gave up: %s' % (
                        msg.data.decode('utf-8', 'replace') or 'no reason'))
                if msg.src_id != peer:
                    continue
                n = len(msg.data)
                if not n or got + n > size:
                    raise StreamError('received %d bytes more than the %d '
                                      'announced' % (got + n - size, size))
                _file_write(fd, msg.data)
                got += n
                if got - acked >= ack_bytes and got < size:
                    _send(peer, ack_handle, _FILE_ACK.pack(got))
                    acked = got
            os.fsync(fd)
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)     # after chown, which may clear set-id bits
            os.close(fd)
            fd = None
            os.rename(tmp, path)
            _file_temps.discard(tmp)
            tmp = None
            dfd = os.open(os.path.dirname(path) or '.',
                          os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            done = True
            return got
        except OSError as e:
            # Name the destination, whatever file the kernel complained about.
            raise type(e)(e.errno, e.strerror or str(e), path)
    finally:
        if announced and not done and not peer_gone:
            # Swallow chunks still in flight until the master's dead message
            # says it stopped; the handler goes before the slot, so nothing
            # falls between them and gets refused noisily.
            _inbox.add_handler(handle, lambda msg: msg.is_dead and
                               _inbox.del_handler(handle))
        _inbox.close_slot(handle)
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            _file_temps.discard(tmp)


def _file_wait_ack(slot, peer, acked):
    """Wait for the master's next acknowledgement; the new acked count."""
    msg = _inbox.wait(slot)
    if msg.is_dead:
        raise ChannelError('the receiver gave up: %s' % (
            msg.data.decode('utf-8', 'replace') or 'no reason'))
    if msg.src_id == peer and len(msg.data) == _FILE_ACK.size:
        acked = max(acked, _FILE_ACK.unpack(msg.data)[0])
    return acked


def _file_send(path, data_to, chunk_size, window):
    """Stream the file at `path` to the master (see the top of this section):
    a header message, then chunks of at most `chunk_size` bytes, never more
    than `window` bytes unacknowledged. Returns the number of bytes sent."""
    if not (type(path) is str and path and type(chunk_size) is int and
            0 < chunk_size <= _inbox.max_message_size and
            type(window) is int and window >= chunk_size):
        raise StreamError('bad _file_send arguments')
    peer, data_handle = _file_check_sender(data_to, 'data_to')
    _file_grow_pipes()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise type(e)(e.errno, e.strerror or str(e), path)
    handle, slot = _inbox.open_slot(peer)
    try:
        st = os.fstat(fd)
        if not _file_is_regular(st.st_mode):
            raise OSError(22, 'not a regular file', path)
        size = st.st_size
        _send(peer, data_handle, _FILE_HEADER.pack(size, st.st_mode & 0o7777),
              reply_to=handle)
        buf = bytearray(min(chunk_size, max(size, 1)))
        view = memoryview(buf)
        sent = acked = 0
        while sent < size:
            n = min(len(buf), size - sent)
            while sent + n - acked > window:
                acked = _file_wait_ack(slot, peer, acked)
            try:
                n = os.preadv(fd, [view[:n]], sent)
            except OSError as e:
                raise type(e)(e.errno, e.strerror or str(e), path)
            if not n:
                raise OSError(5, 'file shrank while being sent', path)
            _send(peer, data_handle, view[:n])
            sent += n
        # The master acknowledges the last byte once it is written; waiting
        # for that also means no acknowledgement arrives after we are gone.
        while acked < size:
            acked = _file_wait_ack(slot, peer, acked)
        return sent
    finally:
        _inbox.close_slot(handle)
        os.close(fd)


def _file_is_regular(mode):
    return mode & 0o170000 == 0o100000


