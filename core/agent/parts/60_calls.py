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


def _parse_call(data):
    call = _decode_call(data)
    if not (type(call) is tuple and len(call) == 6):
        raise StreamError('bad CALL_FUNCTION payload: expected a 6-tuple')
    chain_id, module, class_name, function, args, kwargs = call
    if not (type(module) is str and type(function) is str and
            (class_name is None or type(class_name) is str) and
            type(args) in (tuple, list) and isinstance(kwargs, dict)):
        raise StreamError('bad CALL_FUNCTION payload: wrong field types')
    return chain_id, module, class_name, function, args, kwargs


def _run_call(msg):
    """Run one CALL_FUNCTION message and send the reply, if one is wanted."""
    call = error = None
    try:
        call = _parse_call(msg.data)
        chain_id, module, class_name, function, args, kwargs = call
        if chain_id is not None:
            error = Dispatcher._chain_errors.get(chain_id)
        if error is None:
            result = _resolve(module, class_name, function)(*args, **kwargs)
            data = _encode(result)
            if len(data) > _inbox.max_message_size:
                raise StreamError('reply of %d bytes exceeds '
                                  'max_message_size', len(data))
        elif not msg.reply_to:
            return   # skipped: its chain already failed and was reported
    except BaseException as e:
        # BaseException: a stray sys.exit() in user code must become an error
        # reply, not end the context behind the caller's back.
        error = CallError(e)
        if call is not None and call[0] is not None:
            Dispatcher._chain_errors[call[0]] = error
        if not msg.reply_to:
            what = '.'.join(filter(None, call[1:4])) if call else '?'
            _log(ERROR, 'call_no_reply %s() failed: %s', what, error.args[0])
            return
    if error is not None:
        data = _encode(error)
    if msg.reply_to:
        _send(msg.src_id, msg.reply_to, data)


def _serve():
    next_call = _inbox.next_call
    while True:
        msg = next_call()
        if msg.reply_to == IS_DEAD:
            continue
        if msg.handle == CALL_FUNCTION:
            _run_call(msg)
        elif msg.handle == SHUTDOWN:
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


