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


def _serve():
    """The main thread's loop: run each call our ancestors send, one after
    the other, until SHUTDOWN. This is the hot path of every call, so its
    steps are written out here, with what they use bound to locals, rather
    than called (a few tenths of a microsecond per call, of the few
    microseconds of Python a no-op call costs): decoding, with one unpickler
    kept from call to call; the payload's checks; the lookup; the call; the
    reply's encoding and, in the usual case, its write."""
    next_call = _inbox.next_call
    max_size = _inbox.max_message_size
    modules = sys.modules
    chain_errors = Dispatcher._chain_errors
    scalar_types = _SCALAR_TYPES
    dumps = _pickle_mod.dumps
    pack = _HEADER.pack
    write = os.write
    write_lock = _write_lock
    routes = _routes
    source = unpickler = None
    while True:
        handle, src_id, reply_to, data = next_call()
        if reply_to == IS_DEAD:
            continue
        if handle != CALL_FUNCTION:
            if handle == SHUTDOWN:
                if _debug_fd is not None:
                    _debug_log(INFO, 'SHUTDOWN received')
                _shutdown()
            continue
        call = error = None
        try:
            # The unpickler of the last call, if its payload decoded exactly
            # (making one is ~0.25 us). Its memo is cleared after each
            # payload; after a failure, or bytes past a payload's end, it is
            # dropped (it may still hold that input).
            if source is None:
                source = _Source(b'')
                unpickler = _Unpickler(source)
            decoding, source = source, None
            decoding.data = data
            decoding.used = 0
            decoded = unpickler.load()
            unpickler.memo.clear()
            if decoding.used == len(data):
                source = decoding
            if type(decoded) is not tuple or len(decoded) != 6:
                raise StreamError('bad CALL_FUNCTION payload: expected a '
                                  '6-tuple')
            chain_id, module, class_name, function, args, kwargs = decoded
            if not (type(module) is str and type(function) is str and
                    (class_name is None or type(class_name) is str) and
                    type(args) in (tuple, list) and isinstance(kwargs, dict)):
                raise StreamError('bad CALL_FUNCTION payload: wrong field '
                                  'types')
            call = decoded   # well formed: named in errors below
            if chain_id is not None:
                error = chain_errors.get(chain_id)
            if error is None:
                mod = modules.get(module)
                if mod is None or mod is _stage1_main:
                    fn = _resolve(module, class_name, function)
                else:
                    fn = getattr(getattr(mod, class_name) if class_name
                                 else mod, function)
                result = fn(*args, **kwargs) if kwargs else fn(*args)
                if type(result) in scalar_types:   # _encode()'s first case
                    out = dumps(result, _PICKLE_PROTOCOL)
                else:
                    out = _encode(result)
                if len(out) > max_size:
                    raise StreamError('reply of %d bytes exceeds '
                                      'max_message_size', len(out))
            elif not reply_to:
                continue   # skipped: its chain already failed and was reported
        except BaseException as e:
            # BaseException: a stray sys.exit() in user code must become an
            # error reply, not end the context behind the caller's back.
            error = CallError(e)
            if call is not None and call[0] is not None:
                chain_errors[call[0]] = error
            if not reply_to:
                what = '.'.join(filter(None, call[1:4])) if call else '?'
                _log(ERROR, 'call_no_reply %s() failed: %s', what,
                     error.args[0])
                continue
        if not reply_to:
            continue
        if error is not None:
            out = _encode(error)
        size = len(out)
        if routes or _exiting or _debug_fd is not None or size >= _READ_SIZE:
            _send(src_id, reply_to, out)
            continue
        # _send()'s usual case, written out: a small frame to the parent.
        frame = pack(HEADER_MAGIC, src_id, context_id, context_id, reply_to,
                     0, size) + out
        write_lock.acquire()
        try:
            n = write(_out_fd, frame)
            if n != len(frame):
                _write_rest(_out_fd, frame, n)
        except OSError:
            n = -1   # EPIPE, ECONNRESET, ...: the parent is gone
        finally:
            write_lock.release()
        if n < 0:
            _exit(0, 'parent gone: a write failed')


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


