# ---------------------------------------------------------------------------
# Calls.

class Dispatcher(object):
    """State of call dispatching; named as upstream's, so that a master can
    call ``mitogen.core.Dispatcher.forget_chain`` remotely.

    Calls sharing a `chain_id` form a pipeline: once one fails, the later ones
    fail with the same error without running, so a caller can fire several
    call_no_reply()s and learn of the first failure from a final call().
    """
    _chain_errors = {}   # chain_id -> CallError

    @classmethod
    def forget_chain(cls, chain_id):
        """Forget a chain's error (upstream calls this remotely)."""
        cls._chain_errors.pop(chain_id, None)


def _resolve(module, class_name, function):
    mod = sys.modules.get(module)
    if mod is None or mod is _stage1_main:
        if module == '__main__':   # the master's script, fetched once
            mod = _importer.import_main()
        else:
            __import__(module)
            mod = sys.modules[module]
    obj = getattr(mod, class_name) if class_name else mod
    return getattr(obj, function)


def _run_call(src_id, reply_to, data):
    """Run one CALL_FUNCTION payload and send the reply to (src_id,
    reply_to), if one is wanted (reply_to nonzero). The hot path of every
    call: its steps (decoding, checks, lookup) are written out here rather
    than called, a few tenths of a microsecond per call."""
    call = error = None
    try:
        decoded = _decode_call(data)
        if type(decoded) is not tuple or len(decoded) != 6:
            raise StreamError('bad CALL_FUNCTION payload: expected a 6-tuple')
        chain_id, module, class_name, function, args, kwargs = decoded
        if not (type(module) is str and type(function) is str and
                (class_name is None or type(class_name) is str) and
                type(args) in (tuple, list) and isinstance(kwargs, dict)):
            raise StreamError('bad CALL_FUNCTION payload: wrong field types')
        call = decoded   # well formed: named in errors below
        if chain_id is not None:
            error = Dispatcher._chain_errors.get(chain_id)
        if error is None:
            mod = sys.modules.get(module)
            if mod is None or mod is _stage1_main:
                fn = _resolve(module, class_name, function)
            else:
                fn = getattr(getattr(mod, class_name) if class_name else mod,
                             function)
            result = fn(*args, **kwargs)
            out = _encode(result)
            if len(out) > _inbox.max_message_size:
                raise StreamError('reply of %d bytes exceeds '
                                  'max_message_size', len(out))
        elif not reply_to:
            return   # skipped: its chain already failed and was reported
    except BaseException as e:
        # BaseException: a stray sys.exit() in user code must become an error
        # reply, not end the context behind the caller's back.
        error = CallError(e)
        if call is not None and call[0] is not None:
            Dispatcher._chain_errors[call[0]] = error
        if not reply_to:
            what = '.'.join(filter(None, call[1:4])) if call else '?'
            _log(ERROR, 'call_no_reply %s() failed: %s', what, error.args[0])
            return
    if error is not None:
        out = _encode(error)
    if reply_to:
        _send(src_id, reply_to, out)


def _serve():
    next_call = _inbox.next_call
    while True:
        handle, src_id, reply_to, data = next_call()
        if reply_to == IS_DEAD:
            continue
        if handle == CALL_FUNCTION:
            _run_call(src_id, reply_to, data)
        elif handle == SHUTDOWN:
            if _debug_fd is not None:
                _debug_log(INFO, 'SHUTDOWN received')
            _shutdown()


def _shutdown():
    """Clean exit after SHUTDOWN: run atexit handlers, flush every output
    line, exit 0. os._exit() so that stray user threads cannot keep us."""
    try:
        import atexit
        atexit._run_exitfuncs()
        logging = sys.modules.get('logging')
        if logging is not None:
            logging.shutdown()
    except BaseException:
        pass
    _exit(0)


