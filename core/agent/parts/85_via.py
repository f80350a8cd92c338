# ---------------------------------------------------------------------------
# Contexts started by this one (via=; docs/via.md).
#
# The master calls _proxy_connect(method, options, context_id) here; this
# context then spawns the child with the method's entry in _METHODS, runs the
# same bootstrap the master runs (stage 1, the compressed agent we were sent
# ourselves, the BOOTSTRAP frame), reports the new route upward (ADD_ROUTE)
# and from then on forwards frames both ways:
#
# * parent -> descendant: _Inbox._route() hands frames not addressed to us to
#   _route_away(), which writes them to the child stream leading there. Once
#   this context has a child, a router thread keeps reading from the parent
#   even while the main thread runs a call (see _start_router_thread()).
# * child -> anyone: one reader thread per child (_child_reader) checks that
#   src_id and auth_id belong to that child's subtree, handles ADD_ROUTE,
#   DEL_ROUTE and GET_MODULE addressed to us, delivers our other messages
#   locally, and forwards the rest down (another of our subtrees) or up.
#
# Intermediaries are not the hot path: forwarding costs a thread hop, and a
# context that never starts children runs none of this code. Most of it is
# even kept as source text (_VIA_SOURCE) and compiled on the first
# _proxy_connect(): compiling it at every bootstrap would cost every context
# a few milliseconds of startup for a feature few of them use.

_routes = {}          # descendant context id -> _Child whose stream leads there
_respondents = {}     # our reply handle -> the descendant it waits on


def _expect_reply(handle, respondent):
    """Have the slot of reply handle `handle` (see _Inbox.open_slot) get a
    dead message if `respondent`, a context reached through one of our
    children, goes away before close_slot(handle) -- or at once if it is
    already gone (it may die before the waiter gets this far)."""
    with _route_lock:
        _respondents[handle] = respondent
        routed = respondent in _routes
    if not routed:
        _fail_waiters([respondent], 'context %d disconnected (or was never '
                      'connected)' %
                      (respondent,))


def _forward_up(msg):
    """Write `msg` to the parent unchanged (its src_id/auth_id are a
    descendant's, already verified by _on_child_message)."""
    frame = _HEADER.pack(HEADER_MAGIC, msg.dst_id, msg.src_id, msg.auth_id,
                         msg.handle, msg.reply_to, len(msg.data)) + msg.data
    if not _write_lock.acquire(True, 0.5 if _exiting else -1):
        os._exit(0)
    parent_gone = False
    try:
        _write_rest(_out_fd, frame, 0)
    except OSError:
        parent_gone = True
    finally:
        _write_lock.release()
    if parent_gone:
        _exit(0, 'parent gone: a write failed')   # as _send() does


def _route_away(msg):
    """A message from the parent for another context: pass it down, or
    answer it with a dead message if no child leads there."""
    child = _routes.get(msg.dst_id)
    if child is None or not child.forward(msg):
        _inbox._refuse(msg, 'no route to context %d' % msg.dst_id)


def _proxy_connect(method, options, context_id=None, name=None):
    """Start a child context with connection method `method` (a key of
    _METHODS) and route for it. Called by the master (via=; docs/via.md).

    :param options: dict: the method's options plus python_path,
        remote_name, connect_timeout (seconds), debug, log_level,
        max_message_size.
    :param context_id: the new context's id, allocated by the master; None
        to take one from an ALLOCATE_ID block.
    :returns: upstream's reply shape, a dict: ``id`` and ``name`` of the new
        context and ``msg`` None; or ``id`` None and ``msg`` the error text
        (``code`` then names the failure: spawn_failed, connect_timeout,
        child_died).
    """
    _load_via()
    return globals()['_connect_child'](method, options, context_id, name)


_via_lock = _thread.allocate_lock()


def _load_via():
    """Compile the intermediary's code into this module, once."""
    with _via_lock:
        if '_connect_child' not in globals():
            name = '<mitogen.core via>'
            import linecache   # so that tracebacks show this code
            linecache.cache[name] = (len(_VIA_SOURCE), None,
                                     _VIA_SOURCE.splitlines(True), name)
            exec(compile(_VIA_SOURCE, name, 'exec'), globals())


# The rest of the intermediary, compiled by _load_via(): core/agent/via/*.py,
# joined here by core/agent/build_agent.py as one raw string.
_VIA_SOURCE = None  # build_agent
