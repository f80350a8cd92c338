# ---------------------------------------------------------------------------
# Bootstrap.

def _redirect_stdio():
    """Point fd 0 at /dev/null and fds 1/2 at pipes read by the watcher."""
    null = os.open('/dev/null', os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, 'stdout'), (2, 'stderr')):
        r, w = os.pipe()
        os.dup2(w, fd)           # inheritable, so subprocesses' output is kept
        os.close(w)
        private = _private_dup(r)
        os.close(r)
        r = private
        os.set_blocking(r, False)
        _pipes[r] = [name, b'']
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    sys.stdout = io.open(1, 'w', buffering=1, encoding='utf-8',
                         errors='backslashreplace', closefd=False)
    sys.stderr = io.open(2, 'w', buffering=1, encoding='utf-8',
                         errors='backslashreplace', closefd=False)


def _private_dup(fd):
    """Duplicate fd close-on-exec (subprocesses never see the protocol) and
    high up, out of the way of user code that dup2()s onto low numbers."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _PRIVATE_FD_MIN)
    except (AttributeError, OSError):   # no F_DUPFD_CLOEXEC, or a low rlimit
        return os.dup(fd)


def _bootstrap():
    """Entry point, called by stage 1 with the protocol on fds 0 and 1 and the
    master's boot-time stderr pipe on fd 2. Never returns."""
    global context_id, parent_id, parent_ids, _log_level, _debug_fd
    global _inbox, _out_fd, _importer, _stage1_main
    boot_stderr = os.dup(2)
    try:
        in_fd, out_fd = _private_dup(0), _private_dup(1)
        _inbox = _Inbox(in_fd, DEFAULT_MAX_MESSAGE_SIZE)
        msg = _inbox.read_frame()
        if msg.handle != BOOTSTRAP:
            raise StreamError('expected the BOOTSTRAP frame, got handle %d',
                              msg.handle)
        config = _decode(msg.data)

        context_id = config['context_id']
        parent_ids = list(config.get('parent_ids') or [0])
        parent_id = parent_ids[0]
        _log_level = config.get('log_level', INFO)
        _inbox.max_message_size = config.get('max_message_size',
                                             DEFAULT_MAX_MESSAGE_SIZE)
        remote_name = config.get('remote_name') or 'context%d' % context_id
        package = sys.modules.get('mitogen')
        if package is not None:
            package.context_id = context_id
            package.parent_id = parent_id
            package.parent_ids = parent_ids
            package.is_master = False
        if config.get('debug'):
            try:
                _debug_fd = _open_debug_log()
            except OSError as e:
                _write_boot_error('no debug log: %s' % (e,))
        if _debug_fd is not None:
            _debug_log(INFO, 'bootstrap: context_id=%r parent_ids=%r name=%r'
                       % (context_id, parent_ids, remote_name))

        # argv[0] is 'mitogen:<name>', which CPython cannot resolve to a path.
        if not sys.executable:
            try:
                sys.executable = os.readlink('/proc/self/exe')
            except OSError:
                pass
        sys.argv = ['mitogen:%s' % (remote_name,)]

        _redirect_stdio()
        # Modules missing here are fetched from the parent; upstream's config
        # keys give the allow and deny prefixes (checked again up there).
        _importer = _Importer(_inbox, config.get('whitelist') or (),
                              config.get('blacklist') or ())
        sys.meta_path.append(_importer)
        _stage1_main = sys.modules.get('__main__')
        if 'logging' in sys.modules:
            _install_log_handler(sys.modules['logging'])
        else:
            sys.meta_path.insert(0, _LoggingImportHook())

        os.write(out_fd, b'MITO001\n')
        _out_fd = out_fd
        os.close(boot_stderr)
        boot_stderr = None
        _thread.start_new_thread(_watch, (in_fd,))
    except BaseException as e:
        if boot_stderr is not None:
            try:
                os.write(boot_stderr, ('mitogen: bootstrap failed: %s\n'
                                       % _format_exception(e)).encode())
            except OSError:
                pass
        os._exit(1)
    try:
        _serve()
    except BaseException as e:   # a bug in the agent: say so, never linger
        _log(ERROR, 'agent failed: %s', _format_exception(e))
        _exit(1)
