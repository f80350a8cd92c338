# The code of an intermediary: core/agent/build_agent.py joins core/agent/via/*.py
# into the string _VIA_SOURCE (parts/85_via.py), compiled by _load_via() into the
# module's namespace on first use; these files are fragments of mitogen.core.
#
# stage1.py, put here by the build (tests/agent/test_via.py checks it): the first
# stage of the contexts we start. PREAMBLE_LEN is replaced as the master does.
_STAGE1 = None  # build_agent

_children = []        # direct children, alive
_route_lock = _thread.allocate_lock()   # guards _routes, _children, _Child.ids
_router_started = False
_id_block = [0, 0]    # ALLOCATE_ID block: next id, end (exclusive)
_id_lock = _thread.allocate_lock()


class _BootError(Exception):
    """A child failed to start; code names the failure as the master's
    errc does (spawn_failed, connect_timeout, child_died, ...)."""
    def __init__(self, code, text):
        Exception.__init__(self, text)
        self.code = code


# Bytes queued for one child above which senders wait (as the master's
# streams do), so a child that stops reading cannot make us hoard memory.
_MAX_QUEUED = 16 * 1024 * 1024


class _Child(object):
    """A directly connected child context and the subtree behind it.

    Frames for it are queued and written by a writer thread of its own, so
    a child that is not reading (busy in a long call) stalls only the
    traffic to it, never the routing for everyone else."""

    def __init__(self, context_id, name, proc, rfd, wfd):
        import threading
        self.id = context_id
        self.name = name
        self.proc = proc
        self.rfd = rfd                 # owned by the reader thread
        self.wfd = wfd                 # owned by the writer thread
        self.ids = set([context_id])   # its subtree, itself included
        self.parents = {}              # descendant id -> the id that started it
        self.sent = {}                 # context id -> module names sent to it
        self.cond = threading.Condition()   # guards queue, queued, gone
        self.queue = []
        self.queued = 0
        self.gone = False
        self.complained = False
        _thread.start_new_thread(self._writer, ())

    def write(self, frame):
        """Queue one whole frame; False if the child is gone. Waits while
        more than _MAX_QUEUED bytes are queued."""
        with self.cond:
            while self.queued > _MAX_QUEUED and not self.gone:
                self.cond.wait()
            if self.gone:
                return False
            self.queue.append(frame)
            self.queued += len(frame)
            self.cond.notify_all()
        return True

    def close(self):
        """No more writes; the writer thread closes the descriptor."""
        with self.cond:
            self.gone = True
            self.queue = []
            self.queued = 0
            self.cond.notify_all()

    def _writer(self):
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.gone:
                        self.cond.wait()
                    if self.gone:
                        return
                    frames, self.queue = self.queue, []
                for frame in frames:
                    _write_rest(self.wfd, frame, 0)
                with self.cond:
                    self.queued -= sum(len(f) for f in frames)
                    self.cond.notify_all()
        except OSError:
            self.close()   # the child is gone; its reader reports it
        finally:
            try:
                os.close(self.wfd)
            except OSError:
                pass

    def forward(self, msg):
        return self.write(_HEADER.pack(
            HEADER_MAGIC, msg.dst_id, msg.src_id, msg.auth_id, msg.handle,
            msg.reply_to, len(msg.data)) + msg.data)

    def send(self, dst_id, handle, data, reply_to=0):
        """A message from this context to `dst_id` in the child's subtree."""
        return self.write(_HEADER.pack(
            HEADER_MAGIC, dst_id, context_id, context_id, handle, reply_to,
            len(data)) + data)


def _dead_to_child(child, msg, reason):
    if msg.reply_to and not msg.is_dead:
        child.send(msg.src_id, msg.reply_to, reason.encode('utf-8'),
                   reply_to=IS_DEAD)


def _on_child_message(child, msg):
    ids = child.ids
    if msg.src_id not in ids or msg.auth_id not in ids:
        if not child.complained:
            child.complained = True
            _log(WARNING, 'context %d (%s) sent a message claiming src_id=%d '
                 'auth_id=%d; dropped (logged once)', child.id, child.name,
                 msg.src_id, msg.auth_id)
        return
    dst = msg.dst_id
    if dst == context_id:
        if not msg.is_dead:
            handle = msg.handle
            if handle == GET_MODULE:
                return _serve_module(child, msg)
            if handle == ADD_ROUTE:
                return _on_add_route(child, msg)
            if handle == DEL_ROUTE:
                return _on_del_route(child, msg)
        return _inbox._route(msg)
    other = _routes.get(dst)
    if other is not None:
        if not other.forward(msg):
            _dead_to_child(child, msg, 'no route to context %d' % dst)
        return
    _forward_up(msg)


def _parse_route(data):
    """b'<id>[:<name>]' -> (id, name); ValueError if malformed."""
    text = data.decode('utf-8')
    sid, _, name = text.partition(':')
    if not (sid.isdigit() and len(sid) <= 10):
        raise ValueError('bad context id %r' % (sid[:20],))
    return int(sid), name


def _on_add_route(child, msg):
    """A descendant of `child` started a context: route it through `child`
    and tell the parent, keeping src_id (the context that started it)."""
    try:
        target, _ = _parse_route(msg.data)
    except (ValueError, UnicodeError) as e:
        _log(WARNING, 'context %d sent a bad ADD_ROUTE: %s', child.id, e)
        return
    with _route_lock:
        current = _routes.get(target)
        if (target == 0 or target == context_id or target in parent_ids or
                (current is not None and current is not child)):
            ok = False
        else:
            ok = True
            child.ids.add(target)
            child.parents[target] = msg.src_id
            _routes[target] = child
    if not ok:
        _log(WARNING, 'context %d (%s) sent ADD_ROUTE for context %d, which '
             'it cannot own; refused', child.id, child.name, target)
        return
    msg.dst_id = parent_id
    _forward_up(msg)


def _subtree(child, target):
    """`target` and every id `child` reported as started below it."""
    out = [target]
    for ident in out:
        out.extend(i for i, p in child.parents.items() if p == ident)
    return out


def _on_del_route(child, msg):
    try:
        target, _ = _parse_route(msg.data)
    except (ValueError, UnicodeError):
        return
    with _route_lock:
        if target == child.id or target not in child.ids:
            return
        gone = _subtree(child, target)
        for ident in gone:
            child.ids.discard(ident)
            child.parents.pop(ident, None)
            child.sent.pop(ident, None)
            if _routes.get(ident) is child:
                del _routes[ident]
    _fail_waiters(gone, 'context %d disconnected (DEL_ROUTE from context %d)'
                  % (target, msg.src_id))
    msg.dst_id = parent_id
    _forward_up(msg)


def _child_gone(child, reason):
    """The child's stream ended: forget its subtree, report every id in it
    upward (DEL_ROUTE) and reap the process."""
    child.close()
    with _route_lock:
        ids = sorted(child.ids, key=lambda i: i != child.id)
        for ident in ids:
            if _routes.get(ident) is child:
                del _routes[ident]
        if child in _children:
            _children.remove(child)
    try:
        os.close(child.rfd)
    except OSError:
        pass
    _log(DEBUG, 'context %d (%s) disconnected: %s', child.id, child.name,
         reason)
    for ident in ids:
        _send(parent_id, DEL_ROUTE, str(ident).encode('ascii'))
    _fail_waiters(ids, 'context %d (%s) disconnected: %s' % (
        child.id, child.name, reason))
    _reap(child.proc)


def _fail_waiters(ids, reason):
    """A dead message for each of our reply handles waiting on one of `ids`
    (registered with _expect_reply)."""
    ids = set(ids)
    for handle, respondent in list(_respondents.items()):
        if respondent in ids and _respondents.pop(handle, None) is not None:
            _inbox._route(Message(context_id, respondent, respondent, handle,
                                  IS_DEAD, reason.encode('utf-8')))


def _reap(proc):
    try:
        proc.wait(1.0)
    except Exception:
        try:
            proc.kill()
            proc.wait(5.0)
        except Exception:
            pass


