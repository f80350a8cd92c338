_METHODS = {
    'local': _spawn_local,
    'ssh': _spawn_ssh,
    'sudo': _spawn_sudo,
    'su': _spawn_su,
    'doas': _spawn_doas,
}


def _agent_preamble():
    """The compressed agent as stage 1 received it (kept by stage 1 in the
    `-c` module's `p`), to pass on unchanged."""
    chunks = getattr(_stage1_main, 'p', None)
    if not chunks:
        raise _BootError('spawn_failed', 'this context cannot start others: '
                         'its own bootstrap data is not available')
    return b''.join(chunks)


def _allocate_id():
    """A context id for a child started on our own initiative: from a block
    the master hands out on ALLOCATE_ID (upstream's format: a pickled
    (first, end) tuple, end exclusive)."""
    with _id_lock:
        if _id_block[0] >= _id_block[1]:
            handle, slot = _inbox.open_slot(0)
            try:
                _send(0, ALLOCATE_ID, b'', reply_to=handle)
                msg = _inbox.wait(slot)
            finally:
                _inbox.close_slot(handle)
            if msg.is_dead:
                raise _BootError('spawn_failed', 'ALLOCATE_ID refused: %s' %
                                 msg.data.decode('utf-8', 'replace'))
            block = _decode(msg.data)
            if not (type(block) is tuple and len(block) == 2 and
                    all(type(i) is int for i in block) and
                    0 < block[0] < block[1] <= 0xffffffff):
                raise _BootError('spawn_failed', 'bad ALLOCATE_ID reply')
            _id_block[:] = block
        ident = _id_block[0]
        _id_block[0] += 1
        return ident


def _read_until(fd, buf, marker, deadline, noise):
    """Read from fd into buf until `marker`; drop everything up to it (kept,
    bounded, in noise for error messages)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        i = buf.find(marker)
        if i >= 0:
            if len(noise) < 4096:
                noise += buf[:i][:4096 - len(noise)]
            del buf[:i + len(marker)]
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _BootError('connect_timeout', 'timeout')
        if poller.poll(remaining * 1000):
            chunk = os.read(fd, _READ_SIZE)
            if not chunk:
                # What it said before going ("This account is currently not
                # available.") is the reason: keep it for the message.
                if len(noise) < 4096:
                    noise += buf[:4096 - len(noise)]
                raise _BootError('child_died', 'the child exited during '
                                 'bootstrap')
            buf += chunk


def _boot_error_text(proc, err):
    """`err`'s text plus what the child said on stderr (briefly waited for)."""
    text = str(err)
    # How it ended, if it did on its own (briefly waited for).
    try:
        status = proc.wait(0.3)
    except Exception:
        status = None
    if status is not None and status >= 0:
        text += '; the child exited with status %d' % (status,)
    elif status is not None:
        text += '; the child was killed by signal %d' % (-status,)
    try:
        proc.kill()
    except Exception:
        pass
    stderr = getattr(proc, 'stderr', None)
    if stderr is not None:
        got = b''
        fd = stderr.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + 0.5
        while len(got) < 16384 and poller.poll(
                max(0, deadline - time.monotonic()) * 1000):
            chunk = os.read(fd, 16384)
            if not chunk:
                break
            got += chunk
        if got:
            text += '; stderr: ' + got.decode('utf-8', 'replace').strip()
    _reap(proc)
    return text


def _start_router_thread():
    """Once this context has children, a thread keeps reading from the
    parent (leader/follower: it reads whenever nobody else does), so that
    frames for descendants and module answers flow while the main thread
    runs a call."""
    global _router_started
    with _route_lock:
        if _router_started:
            return
        _router_started = True
    # From now on only this thread reads from the parent. A waiter that led
    # instead would block in read() while a child's reader thread queued its
    # reply (or the dead message of _fail_waiters) on its slot, and stay blocked
    # until the parent happened to send something. Set before the thread runs,
    # so nobody takes the role meanwhile; whoever holds it now hands it over
    # when its own message arrives (_Inbox._step_down).
    slot = _Slot()
    with _inbox._lock:
        _inbox.router = slot

    def run():
        try:
            _inbox.wait(slot)   # nothing is ever delivered to this slot
        except BaseException as e:
            _log(ERROR, 'router thread failed: %s', _format_exception(e))
            _exit(1)
    _thread.start_new_thread(run, ())
    import atexit
    atexit.register(_stop_children)


def _stop_children():
    """On SHUTDOWN: ask each child to shut down too and give them a moment."""
    with _route_lock:
        children = list(_children)
    for child in children:
        child.send(child.id, SHUTDOWN, b'')
    deadline = time.monotonic() + 1.0
    for child in children:
        try:
            child.proc.wait(max(0.01, deadline - time.monotonic()))
        except Exception:
            pass


def _connect_child(method, options, context_id, name):
    # _proxy_connect()'s body (its docstring says what this does).
    options = dict(options or {})
    proc = None
    try:
        spawn = _METHODS.get(method)
        if spawn is None:
            raise _BootError('spawn_failed', 'unknown connection method %r '
                             '(this agent knows %s)' %
                             (method, ', '.join(sorted(_METHODS))))
        preamble = _agent_preamble()
        if context_id is None:
            context_id = _allocate_id()
        if (type(context_id) is not int or context_id <= 0 or
                context_id == globals()['context_id'] or
                context_id in _routes):
            raise _BootError('spawn_failed', 'bad context id %r' %
                             (context_id,))
        remote_name = options.get('remote_name') or sys.argv[0].partition(
            ':')[2] or 'context%d' % context_id
        timeout = float(options.get('connect_timeout') or 30.0)
        stage1 = _STAGE1.rstrip('\n').replace('PREAMBLE_LEN',
                                              str(len(preamble)))
        try:
            proc, default_name = spawn(options, stage1, remote_name)
        except OSError as e:
            raise _BootError('spawn_failed', 'cannot start %s: %s' %
                             (method, e))
        name = name or default_name
        config = {
            'context_id': context_id,
            'parent_ids': [globals()['context_id']] + list(parent_ids),
            'remote_name': remote_name,
            'debug': bool(options.get('debug')),
            'log_level': int(options.get('log_level') or INFO),
            'max_message_size': int(options.get('max_message_size') or
                                    _inbox.max_message_size),
        }
        if _importer.whitelist != ['']:
            config['whitelist'] = list(_importer.whitelist)
        if _importer.blacklist:
            config['blacklist'] = list(_importer.blacklist)
        data = _encode(config)
        frame = _HEADER.pack(HEADER_MAGIC, context_id, config['parent_ids'][0],
                             config['parent_ids'][0], BOOTSTRAP, 0,
                             len(data)) + data
        rfd, wfd = proc.stdout.fileno(), proc.stdin.fileno()
        buf, noise = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            _read_until(rfd, buf, b'MITO000\n', deadline, noise)
            _write_rest(wfd, preamble + frame, 0)
            _read_until(rfd, buf, b'MITO001\n', deadline, noise)
        except _BootError as e:
            if e.code == 'connect_timeout':
                e = _BootError(e.code, 'no bootstrap within %d ms' %
                               (timeout * 1000))
            if noise:
                e = _BootError(e.code, '%s; stdout: %s' % (
                    e, bytes(noise).decode('utf-8', 'replace')))
            raise e
        except OSError as e:
            raise _BootError('child_died', 'bootstrap failed: %s' % (e,))
    except _BootError as e:
        text = _boot_error_text(proc, e) if proc is not None else str(e)
        return {'id': None, 'name': None, 'code': e.code,
                'msg': 'context %r failed to start on %s: %s' % (
                    name or method, os.uname()[1], text)}
    # Our own descriptors: the Popen file objects would close theirs again
    # when collected, maybe after the numbers were reused.
    rfd, wfd = _private_dup(rfd), _private_dup(wfd)
    proc.stdout.close()
    proc.stdin.close()
    child = _Child(context_id, name, proc, rfd, wfd)
    with _route_lock:
        _routes[context_id] = child
        _children.append(child)
    _start_router_thread()
    if proc.stderr is not None:
        _thread.start_new_thread(_drain_stderr,
                                 (os.dup(proc.stderr.fileno()), name))
        proc.stderr.close()
    # Upward before the reply: the master routes the id when the call returns.
    _send(parent_id, ADD_ROUTE, ('%d:%s' % (context_id, name)).encode('utf-8'))
    _thread.start_new_thread(_child_reader, (child, bytes(buf)))
    return {'id': context_id, 'name': name, 'msg': None}
