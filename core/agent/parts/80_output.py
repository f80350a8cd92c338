# ---------------------------------------------------------------------------
# Output forwarding and the parent watcher (one background thread).

_fwd_lock = _thread.allocate_lock()   # serialises reads of the output pipes
_pipes = {}                           # read fd -> [logger name, partial line]


def _pump(fd):
    """Forward the complete lines fd has ready, as one record (the lines
    separated by newlines): consecutive lines cost the master one record, not
    one each. Returns True if data was read, None if none was ready, False at
    EOF (the partial line is then forwarded too), or the seconds to wait
    before reading again when this context is over its output budget
    (_Pacer): nothing is read meanwhile, so the writer blocks on the full pipe
    rather than its output being dropped."""
    name_partial = _pipes[fd]
    wait = _pacer.delay()
    if wait > 0:
        return wait
    try:
        chunk = os.read(fd, _READ_SIZE)
    except BlockingIOError:
        return None
    if not chunk:
        if name_partial[1]:
            _pacer.spent(_forward_log(name_partial[0], INFO,
                                      name_partial[1].decode('utf-8', 'replace')))
            name_partial[1] = b''
        return False
    text, newline, partial = (name_partial[1] + chunk).rpartition(b'\n')
    name_partial[1] = partial
    if len(partial) >= _READ_SIZE:   # no newline in sight: send it
        text = text + b'\n' + partial if newline else partial
        name_partial[1] = b''
    elif not newline:
        return True   # no complete line yet
    _pacer.spent(_forward_log(name_partial[0], INFO, text.decode('utf-8', 'replace')))
    return True


def _flush_output():
    """Forward everything already written to fds 1 and 2, partial lines too."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if not _fwd_lock.acquire(True, 0.5):
        return
    try:
        for fd, name_partial in _pipes.items():
            while True:
                got = _pump(fd)
                if got is True:
                    continue
                if not got:
                    break
                time.sleep(min(got, 0.1))   # over budget: wait, lose nothing
            if name_partial[1]:
                _pacer.forward(name_partial[0], INFO,
                               name_partial[1].decode('utf-8', 'replace'))
                name_partial[1] = b''
    finally:
        _fwd_lock.release()


def _exit_on_eof():
    if _out_fd is None:   # still bootstrapping: that is a failure
        _exit(1, 'stdin closed before the BOOTSTRAP frame was complete')
    _exit(0, 'parent closed the connection')


def _exit(status, reason=None):
    """Leave now, forwarding pending output first if the parent can take it."""
    global _exiting
    if not _exiting:
        _exiting = True
        if reason and _debug_fd is not None:
            _debug_log(INFO, 'exiting: %s' % reason)
        if reason and status and _out_fd is None:
            _write_boot_error(reason)
        _file_cleanup()    # unfinished received files (file transfer)
        try:
            _flush_output()
        except BaseException:
            pass
    os._exit(status)


def _watch(in_fd):
    """Background thread: forward fds 1/2 line by line, and exit the moment
    the parent hangs up, whatever the main thread is doing."""
    try:
        poller = select.poll()
        # Event mask 0: poll() still reports POLLHUP/POLLERR/POLLNVAL, which
        # is all we want to know about the inbound protocol descriptor.
        poller.register(in_fd, 0)
        for fd in _pipes:
            poller.register(fd, select.POLLIN)
        # While over the output budget, only the parent is watched.
        parent_only = select.poll()
        parent_only.register(in_fd, 0)
        wait = 0
        while True:
            if wait > 0:
                events = parent_only.poll(min(wait, 0.1) * 1000)
                wait = 0
            else:
                events = poller.poll()
            for fd, event in events:
                if fd == in_fd:
                    if _out_fd is not None:
                        # Don't let a dead parent's full pipe block the exit.
                        try:
                            os.set_blocking(_out_fd, False)
                        except OSError:
                            pass
                    _exit(0, 'parent hung up')
                with _fwd_lock:
                    got = _pump(fd)
                if got is False:
                    poller.unregister(fd)
                elif isinstance(got, float):
                    wait = got
    except BaseException as e:
        _log(ERROR, 'watcher thread failed: %r', e)
        _exit(1)


# ---------------------------------------------------------------------------
# Forwarding `logging` records. `logging` costs ~15 ms to import, so the agent
# never imports it; it installs the handler at bootstrap if `logging` is
# already loaded, and otherwise from an import hook that fires right after
# user code first imports it.

_emitting = set()   # thread ids inside emit(), to stop recursion


def _install_log_handler(logging):
    """Make the root logger forward records at or above our log level."""
    class ForwardHandler(logging.Handler):
        """Sends each record to the master as FORWARD_LOG."""
        def emit(self, record):
            ident = _thread.get_ident()
            if ident in _emitting:   # something inside emit() logged
                return
            _emitting.add(ident)
            try:
                _pacer.forward(record.name, record.levelno, self.format(record))
            except Exception:
                pass   # never report via logging or stderr: it would loop
            finally:
                _emitting.discard(ident)

    root = logging.getLogger()
    root.addHandler(ForwardHandler(_log_level))
    root.setLevel(_log_level)


class _LoggingImportHook(object):
    """sys.meta_path finder that only reacts to 'logging': it asks the other
    finders for the real spec and wraps its loader, so that the handler is
    installed as soon as the module has executed. It removes itself then."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'logging':
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, 'find_spec', None)
            spec = (finder is not self and find_spec and
                    find_spec(fullname, path, target))
            if spec:
                break
        else:
            return None
        if hasattr(spec.loader, 'exec_module'):
            spec.loader = _LoggingLoader(spec.loader, self)
        return spec


class _LoggingLoader(object):
    def __init__(self, real, hook):
        self.real = real
        self.hook = hook

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        # Put the real loader back so linecache, reload() etc. see it.
        module.__loader__ = module.__spec__.loader = self.real
        self.real.exec_module(module)
        try:
            sys.meta_path.remove(self.hook)
        except ValueError:
            pass
        try:
            _install_log_handler(module)
        except Exception as e:   # never break the user's import
            _log(WARNING, 'could not install the log forwarder: %r', e)


