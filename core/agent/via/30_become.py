# --- sudo / su / doas started by this context (via=; docs/become.md) ---------
import signal
#
# The same "hybrid TTY" scheme as the master's become.cpp: the child's stdin and
# stdout are the protocol pipes, stderr a pipe, and a fresh pseudo-terminal is
# its controlling terminal (posix_spawn with setsid, then opening the terminal
# makes it the session's). sudo and doas prompt on the terminal; Linux su on
# stderr (answered on stdin). We answer the first prompt once, turn failure
# messages into the master's error codes, and return as soon as the
# interpreter writes to stdout (MITO000 follows). The terminal stays open for
# the child's lifetime (closing it would hang the child up).

# The prompt and failure texts (lower-case substrings) come from the master with
# each connect (become.cpp, become_defaults(), or the user's): one list, kept there.

class _BecomeProc(object):
    """A child started through sudo/su/doas: Popen's shape for _connect_child
    (pid, stdin, stdout, stderr, kill(), wait()), plus the terminal."""

    class _End(object):
        def __init__(self, fd):
            self.fd = fd

        def fileno(self):
            return self.fd

        def close(self):
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __init__(self, pid, stdin_w, stdout_r, stderr_r, tty_master):
        self.pid = pid
        self.stdin = self._End(stdin_w)
        self.stdout = self._End(stdout_r)
        self.stderr = self._End(stderr_r)
        self.tty = self._End(tty_master)
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self.returncode

    def _reaped(self, status):
        self.returncode = (os.WEXITSTATUS(status) if os.WIFEXITED(status)
                           else -os.WTERMSIG(status))
        self.tty.close()
        self.tty_slave.close()

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                import subprocess
                raise subprocess.TimeoutExpired('become', timeout)
            time.sleep(0.01)
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)


def _become_spawn(argv):
    """posix_spawn `argv` with pipes on 0/1/2 and a new terminal as its
    controlling terminal. Returns a _BecomeProc."""
    import pty
    import termios
    master, slave = pty.openpty()
    # No echo: a password typed at the terminal is never read back to us.
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    slave_path = os.ttyname(slave)
    # Our copy of the terminal stays open during the dialogue: without it the
    # master side reports hang-up until the child has opened the terminal.
    fds = []
    try:
        in_r, in_w = os.pipe()
        fds += [in_r, in_w]
        out_r, out_w = os.pipe()
        fds += [out_r, out_w]
        err_r, err_w = os.pipe()
        fds += [err_r, err_w]
        actions = [
            (os.POSIX_SPAWN_DUP2, in_r, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
            # After setsid(): opening a terminal makes it the controlling one.
            (os.POSIX_SPAWN_OPEN, 3, slave_path, os.O_RDWR, 0),
            (os.POSIX_SPAWN_CLOSE, 3),
        ]
        path = argv[0]
        if os.sep not in path:
            import shutil
            path = shutil.which(path) or path
        pid = os.posix_spawn(path, list(argv), os.environ,
                             file_actions=actions, setsid=True,
                             setsigdef=(signal.SIGINT, signal.SIGPIPE,
                                        signal.SIGHUP, signal.SIGTERM))
    except BaseException:
        for fd in fds + [master, slave]:
            os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    proc = _BecomeProc(pid, in_w, out_r, err_r, master)
    proc.tty_slave = proc._End(slave)
    return proc


def _become_dialogue(proc, method, options, deadline):
    """Answer the password prompt once; return when the interpreter writes
    to stdout. Raises _BootError with the master's codes on failure."""
    prompts, incorrect, not_allowed, required = (
        [p.lower() for p in options.get(k) or ()]
        for k in ('password_prompts', 'incorrect_prompts', 'not_allowed_prompts',
                  'password_required'))
    password = options.get('password')
    target = options.get('username') or 'root'
    sent = [False]
    text = {True: b'', False: b''}     # terminal / stderr text so far
    poller = select.poll()
    tty_fd, err_fd, out_fd = (proc.tty.fileno(), proc.stderr.fileno(),
                              proc.stdout.fileno())
    for fd in (tty_fd, err_fd, out_fd):
        poller.register(fd, select.POLLIN)

    def seen(tty):
        data = text[tty].decode('utf-8', 'replace')
        if password:
            data = data.replace(password, '********')
        return data

    def fail(code, what):
        said = (seen(True) + ' ' + seen(False)).replace('\x00', '').strip()
        raise _BootError(code, '%s: %s%s' % (method, what,
                                             '; said: ' + said[-2048:]
                                             if said else ''))

    def check(tty):
        low = seen(tty).lower()
        after = low.rpartition(_SENT_MARK)[2] if sent[0] else low
        lines, _, partial = after.rpartition('\n')
        if any(p in low for p in not_allowed):
            fail('become_not_allowed', 'this user may not become %s' % target)
        if any(p in low for p in required):
            fail('become_password_required', 'a password is required to '
                 'become %s and none was given' % target)
        if sent[0] and any(p in lines for p in incorrect):
            fail('become_password_wrong', 'the password is incorrect')
        if partial.strip() and any(p in partial for p in prompts):
            if sent[0]:
                fail('become_password_wrong', 'the password is incorrect '
                     '(asked again)')
            if not password:
                fail('become_password_required', 'a password is required '
                     'to become %s and none was given' % target)
            sent[0] = True
            text[tty] += _SENT_MARK.encode()  # later lines are the verdict
            _write_rest(tty_fd if tty else proc.stdin.fileno(),
                        (password + '\n').encode('utf-8'), 0)

    open_fds = set([tty_fd, err_fd])
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            fail('connect_timeout', 'no interpreter within the connect '
                 'timeout (%s)' % ('password sent' if sent[0] else
                                   'no password prompt seen'))
        events = poller.poll(remaining * 1000)
        for fd, ev in events:
            if fd == out_fd:
                if ev & select.POLLIN:
                    return                  # the interpreter is talking
                fail('child_died', 'exited before starting the interpreter')
            try:
                chunk = os.read(fd, 4096)
            except OSError:                 # EIO: the terminal is closed
                chunk = b''
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            tty = fd == tty_fd
            if len(text[tty]) < 65536:
                text[tty] += chunk
            check(tty)
        if not open_fds and proc.poll() is not None:
            for tty in (True, False):
                check(tty)
            fail('child_died', 'exited with status %s before starting the '
                 'interpreter' % (proc.returncode,))


_SENT_MARK = u'\x00<password sent>\x00'


def _python_command(options, stage1, remote_name):
    python = options.get('python_path') or [sys.executable or 'python3']
    if isinstance(python, str):
        python = [python]
    import binascii
    b64 = binascii.b2a_base64(stage1.encode('utf-8')).decode().strip()
    return list(python) + ['-c', 'import base64;exec(base64.b64decode("%s"))'
                           % b64, 'mitogen:' + remote_name]


def _spawn_become(method, argv, options):
    deadline = time.monotonic() + float(options.get('connect_timeout') or 30)
    proc = _become_spawn(argv)
    try:
        _become_dialogue(proc, method, options, deadline)
    except BaseException:
        proc.tty.close()
        proc.tty_slave.close()
        raise
    # Keep reading the terminal for the child's life: something it runs may
    # write to /dev/tty, and would block once the terminal's buffer is full.
    # Our copy of the slave side (closed when the child is reaped) keeps the
    # terminal alive after doas has exec'd Python, which holds none of it.
    _thread.start_new_thread(_drain_tty, (os.dup(proc.tty.fileno()),))
    return proc, '%s.%s' % (method, options.get('username') or 'root')


def _drain_tty(fd):
    try:
        while os.read(fd, 65536):
            pass
    except OSError:      # EIO: every process holding the terminal is gone
        pass
    finally:
        os.close(fd)


def _spawn_sudo(options, stage1, remote_name):
    """Method 'sudo'."""
    argv = [options.get('sudo_path') or 'sudo', '-u',
            options.get('username') or 'root']
    if options.get('preserve_env'):
        argv.append('-E')
    if options.get('set_home'):
        argv.append('-H')
    if options.get('login'):
        argv.append('-i')
    for flag, key in (('-r', 'selinux_role'), ('-t', 'selinux_type')):
        if options.get(key):
            argv += [flag, options[key]]
    argv.append('--')
    return _spawn_become('sudo', argv + _python_command(options, stage1,
                                                        remote_name), options)


def _spawn_su(options, stage1, remote_name):
    """Method 'su': su runs its -c argument through the target's shell."""
    target = options.get('username') or 'root'
    cmd = ' '.join(_sh_quote(a) for a in _python_command(options, stage1,
                                                         remote_name))
    return _spawn_become('su', [options.get('su_path') or 'su', target, '-c',
                                cmd], options)


def _spawn_doas(options, stage1, remote_name):
    """Method 'doas'."""
    argv = [options.get('doas_path') or 'doas', '-u',
            options.get('username') or 'root']
    return _spawn_become('doas', argv + _python_command(options, stage1,
                                                        remote_name), options)


# Connection methods this agent can run: name -> fn(options, stage1,
# remote_name) returning (process, default context name). The process is a
# subprocess.Popen or a lookalike: .pid, .stdin/.stdout/.stderr (objects
# with fileno(); stderr may be None), .kill(), .wait(timeout). stdout must
# carry the agent's output from the start (a method with prompts, such as a
# PTY-based sudo, answers them before returning or wraps stdout so that what
# it returns starts clean; MITO000 may follow other output). Raise _BootError
# to fail with a message. docs/via.md, "Adding a method".
