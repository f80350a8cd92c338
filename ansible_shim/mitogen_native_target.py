"""What the Ansible connection plugins of mitogen-native run inside a context.

The controller calls these functions in the agent of a target
(``ctx.call(mitogen_native_target.exec_command, ...)``); the module reaches the
target through module forwarding (GET_MODULE), so it must stand alone: Python
3.6+, the standard library only, never ``mitogen_native`` nor ``ansible``.

Two ways to run a command, both giving what a fresh process started by the
stock ssh plugin gives: the exit status, and stdout and stderr as exact bytes.

* :func:`exec_command` in general runs the command with the login shell of the
  context's user, as sshd does (``$SHELL -c CMD``), through a pseudo-terminal
  when the caller asks for one (the stock plugin passes ``ssh -tt`` for
  sudoable commands without input: stderr then arrives merged into stdout, with
  CRLF line ends).
* When the command is only Ansible's pipelined module run, ``[sh -c] [VAR=value
  ...] PYTHON [&& sleep 0]`` with the payload on stdin, and PYTHON is the
  interpreter this agent runs on, the payload runs in a fork of this warm agent
  instead of a new interpreter (:func:`_run_forked`): same argv, stdin,
  environment, exit status and output, without the interpreter's start-up.
"""

import errno
import os
import select
import signal
import subprocess
import sys

#: Shells whose ``-c BODY`` the pipelined-command parser looks into.
_SHELLS = ('sh', 'bash', 'dash', 'ash', 'ksh', 'zsh')

#: Environment names that change how an interpreter starts (stdio encoding,
#: sys.path, flags, locale): a fork of the agent could not honour a change of
#: them, so such a command gets a fresh interpreter.
_STARTUP_ENV_PREFIXES = ('PYTHON', 'LC_ALL', 'LC_CTYPE', 'LANG')

_READ_SIZE = 65536


def exec_command(cmd, in_data=None, use_tty=False, fork_ok=True, cwd=None,
                 shell=None, term=None):
    """Run `cmd` (text) as the stock ssh plugin would on this host and return
    ``(rc, stdout, stderr)`` with stdout and stderr as bytes.

    :param in_data: bytes written to the command's stdin (then closed); None:
        stdin is at end of file at once.
    :param use_tty: run under a new pseudo-terminal (as ``ssh -tt``): stdout
        and stderr merged into stdout, "\\n" written as "\\r\\n".
    :param fork_ok: allow running a pipelined Ansible module in a fork of this
        agent when the command asks for this agent's interpreter.
    :param cwd: directory to run in (default: the agent's, i.e. the login
        directory).
    :param shell: the shell that parses `cmd` (default: the user's login
        shell, as sshd uses).
    :param term: TERM for a command under a terminal (sshd sets the client's).
    """
    if isinstance(cmd, bytes):
        cmd = cmd.decode('utf-8', 'surrogateescape')
    if in_data is not None and not isinstance(in_data, bytes):
        in_data = bytes(in_data)
    if fork_ok and in_data is not None and not use_tty:
        plan = pipelined_python(cmd)
        if plan is not None:
            env_updates, python, via_shell = plan
            first = cmd.split(None, 1)[0]
            if via_shell and first.startswith('/') and \
                    os.path.basename(os.path.realpath(shell or _login_shell())) == 'bash':
                # bash exports the path of the program it runs as $_.
                env_updates = dict(env_updates)
                env_updates.setdefault('_', first)
            result = _run_forked(python, env_updates, in_data, cwd, via_shell)
            if result is not None:
                return result
    argv = [shell or _login_shell(), '-c', cmd]
    if use_tty and in_data is None:
        result = _run_with_tty(argv, cwd, term)
        if result is not None:
            return result
    return _run_piped(argv, in_data, cwd)


#: What CPython's locale coercion (PEP 538) exports as LC_CTYPE when it
#: starts in the C locale.
_COERCED_CTYPES = ('C.UTF-8', 'C.utf8', 'UTF-8')


def _initial_environ():
    """The environment this process was started with (before the interpreter
    changed it), from /proc; None where that is not available."""
    try:
        with open('/proc/self/environ', 'rb') as f:
            data = f.read()
    except OSError:
        return None
    env = {}
    for item in data.split(b'\0'):
        name, eq, value = item.partition(b'=')
        if eq:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return env


def _undo_locale_coercion():
    """Started in the C locale, CPython exports LC_CTYPE=C.UTF-8 to its own
    environment, and every process the agent starts would inherit it: shell
    commands (which sshd runs without it), and contexts started through this
    one (sudo keeps LC_* variables), whose interpreter then skips the coercion
    and UTF-8 mode a fresh one gets. Take it out again; return the value, which
    a forked module run puts back (a fresh interpreter would coerce too)."""
    ctype = os.environ.get('LC_CTYPE')
    if ctype not in _COERCED_CTYPES:
        return None
    initial = _initial_environ()
    if initial is None or 'LC_CTYPE' in initial:
        return None
    del os.environ['LC_CTYPE']
    return ctype


# Runs once per agent, at the first call into this module (before the plugin
# starts a become context through this agent: see ready()).
_coerced_ctype = _undo_locale_coercion()


def ready():
    """Nothing but this module's import: the plugin calls it before it starts a
    context through this agent, so the child inherits a clean environment."""
    return True


def _login_shell():
    try:
        import pwd
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except (ImportError, KeyError):
        shell = None
    if not shell or not os.access(shell, os.X_OK):
        shell = '/bin/sh'
    return shell


def _status(returncode):
    """A child's exit status as a shell reports it (killed by N: 128 + N)."""
    if returncode < 0:
        return 128 - returncode
    return returncode


def _run_piped(argv, in_data, cwd):
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, close_fds=True)
    stdout, stderr = proc.communicate(in_data or b'')
    return _status(proc.returncode), stdout, stderr


# ---------------------------------------------------------------------------
# Commands under a pseudo-terminal (what `ssh -tt` gives the stock plugin).

def _run_with_tty(argv, cwd, term=None):
    env = None
    if term:
        env = dict(os.environ)
        env['TERM'] = term
    try:
        master, slave = os.openpty()
    except (AttributeError, OSError):
        return None
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                cwd=cwd, close_fds=True, start_new_session=True,
                                env=env)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    os.close(slave)
    chunks = []
    try:
        os.set_blocking(master, False)
        poller = select.poll()
        poller.register(master, select.POLLIN)
        exited = False
        while True:
            events = poller.poll(50)
            progress = False
            if events:
                got = _read_available(master, chunks)
                if got is False:       # the terminal hung up: every writer is gone
                    break
                progress = got
            if not progress:
                if exited:
                    break
                # The command may exit while something it started keeps the
                # terminal open (as `ssh -tt` does, we stop once it has exited
                # and its output is drained).
                exited = proc.poll() is not None
    finally:
        os.close(master)
    proc.wait()
    return _status(proc.returncode), b''.join(chunks), b''


def _read_available(fd, chunks):
    """Read what `fd` holds now; True if something came, False at EOF/EIO."""
    got = None
    while True:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return got or None
        except OSError as e:
            if e.errno == errno.EIO:   # Linux: the slave side has no writer left
                return False
            raise
        if not data:
            return False
        chunks.append(data)
        got = True


# ---------------------------------------------------------------------------
# Pipelined module runs in a fork of this agent.

def _words(body):
    """Split a shell command into words and ``&&``, or None if it uses
    anything beyond plain words, quotes without expansions and ``&&``
    (parameters, redirections, other operators, backslashes, ...)."""
    words, word, in_word, i, n = [], [], False, 0, len(body)
    safe_extra = set('-_./,:=+@%^')
    while i < n:
        c = body[i]
        if c in ' \t\n':
            if in_word:
                words.append(''.join(word))
                word, in_word = [], False
            i += 1
        elif c == "'":
            end = body.find("'", i + 1)
            if end < 0:
                return None
            word.append(body[i + 1:end])
            in_word = True
            i = end + 1
        elif c == '"':
            # Only what shlex.quote() produces ('"'"' for a quote): no expansion.
            end = body.find('"', i + 1)
            if end < 0:
                return None
            inner = body[i + 1:end]
            if any(ch in inner for ch in '$`\\!'):
                return None
            word.append(inner)
            in_word = True
            i = end + 1
        elif c == '&' and body.startswith('&&', i):
            if in_word:
                words.append(''.join(word))
                word, in_word = [], False
            words.append(('&&',))
            i += 2
        elif c.isalnum() or c in safe_extra:
            word.append(c)
            in_word = True
            i += 1
        else:
            return None
    if in_word:
        words.append(''.join(word))
    return words


def pipelined_python(cmd):
    """If `cmd` is ``[SHELL -c '...'] [NAME=value ...] PYTHON [&& sleep 0]``,
    return ``(env_updates, python, via_shell)``; otherwise None. Nested
    ``SHELL -c`` (what become leaves behind) is looked through; `via_shell`
    is the innermost of those shells, which would start PYTHON (or None)."""
    via_shell = None
    for _ in range(4):
        words = _words(cmd)
        if not words:
            return None
        if len(words) >= 3 and words[-3:] == [('&&',), 'sleep', '0']:
            words = words[:-3]
        if (len(words) == 3 and isinstance(words[0], str) and
                os.path.basename(words[0]) in _SHELLS and words[1] == '-c'
                and isinstance(words[2], str)):
            cmd = words[2]
            via_shell = words[0]
            continue
        break
    else:
        return None
    if not words or any(not isinstance(w, str) for w in words):
        return None
    env_updates = {}
    for w in words[:-1]:
        name, eq, value = w.partition('=')
        if not eq or not name or not (name[0].isalpha() or name[0] == '_') or \
                not all(ch.isalnum() or ch == '_' for ch in name):
            return None
        env_updates[name] = value
    python = words[-1]
    if '=' in python:
        return None
    return env_updates, python, via_shell


def _resolve(program, path):
    if '/' in program:
        return os.path.abspath(program)
    for d in (path or '').split(os.pathsep):
        candidate = os.path.join(d or '.', program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None


def _run_forked(python, env_updates, in_data, cwd, via_shell='/bin/sh'):
    """Run the Python program `in_data` as ``PYTHON < in_data`` would, in a
    fork of this process. Returns None (the caller then starts a real process)
    when PYTHON is not this interpreter or the environment changes something
    only a fresh interpreter can apply."""
    env = dict(os.environ)
    env.update(env_updates)
    if via_shell:
        env['PWD'] = os.path.abspath(cwd or os.getcwd())   # sh exports it
    if _coerced_ctype is not None and 'LC_CTYPE' not in env_updates:
        # The locale variables are the agent's (checked below): a fresh
        # interpreter coerces the C locale as the agent did.
        env['LC_CTYPE'] = _coerced_ctype
    exe = _resolve(python, env.get('PATH'))
    own = sys.executable and os.path.realpath(sys.executable)
    if not exe or not own or os.path.realpath(exe) != own:
        return None
    for name, value in env_updates.items():
        if name.startswith(_STARTUP_ENV_PREFIXES) and os.environ.get(name) != value:
            return None
    for stream in (sys.__stdout__, sys.__stderr__, sys.__stdin__):
        if stream is None:
            return None

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    os.close(in_w)    # the interpreter read its program from stdin: stdin is at EOF
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    pid = os.fork()
    if pid == 0:
        # Never return into the agent from here, whatever happens.
        status = 70
        try:
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            status = _child_main(exe, env, in_data, cwd)
        finally:
            os._exit(status)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    stdout, stderr = _drain(out_r, err_r)
    _, wstatus = _waitpid(pid)
    if os.WIFSIGNALED(wstatus):
        sig = os.WTERMSIG(wstatus)
        rc = 128 + sig
        if via_shell:
            stderr += _shell_signal_note(via_shell, sig, os.WCOREDUMP(wstatus))
    else:
        rc = os.WEXITSTATUS(wstatus)
    return rc, stdout, stderr


def _shell_signal_note(shell, sig, core):
    """What the shell that would have waited for the interpreter prints when
    a signal killed it (dash: the signal's description; bash's note names a
    pid, which cannot match anyway)."""
    path = shell if '/' in shell else (_resolve(shell, os.environ.get('PATH')) or shell)
    if os.path.basename(os.path.realpath(path)) != 'dash':
        return b''
    if sig in (signal.SIGINT, signal.SIGPIPE):
        return b''
    try:
        text = signal.strsignal(sig) or 'Signal %d' % sig
    except (AttributeError, ValueError):
        return b''
    if core:
        text += ' (core dumped)'
    return (text + '\n').encode()


def _waitpid(pid):
    while True:
        try:
            return os.waitpid(pid, 0)
        except InterruptedError:
            continue


def _drain(out_r, err_r):
    chunks = {out_r: [], err_r: []}
    open_fds = set(chunks)
    poller = select.poll()
    for fd in open_fds:
        poller.register(fd, select.POLLIN)
    try:
        while open_fds:
            for fd, _ in poller.poll():
                data = os.read(fd, _READ_SIZE)
                if data:
                    chunks[fd].append(data)
                else:
                    poller.unregister(fd)
                    open_fds.discard(fd)
    finally:
        os.close(out_r)
        os.close(err_r)
    return b''.join(chunks[out_r]), b''.join(chunks[err_r])


def _close_other_fds():
    try:
        fds = [int(x) for x in os.listdir('/proc/self/fd')]
    except (OSError, ValueError):
        os.closerange(3, 65536)
        return
    for fd in fds:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass


def _reset_signals():
    """The dispositions a freshly started interpreter has."""
    for name in ('SIGCHLD', 'SIGHUP', 'SIGTERM', 'SIGQUIT', 'SIGALRM', 'SIGUSR1',
                 'SIGUSR2', 'SIGTSTP', 'SIGTTIN', 'SIGTTOU', 'SIGWINCH'):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    for name in ('SIGPIPE', 'SIGXFSZ'):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass


def _forget_agent():
    """Drop what belongs to the agent (its importer, its log forwarding, its
    modules), so the program sees what a fresh interpreter shows."""
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not type(f).__module__.startswith('mitogen')]
    logging = sys.modules.get('logging')
    if logging is not None:
        root = logging.getLogger()
        for h in list(root.handlers):
            if type(h).__module__.startswith('mitogen'):
                root.removeHandler(h)
    for name in list(sys.modules):
        if name == 'mitogen' or name.startswith('mitogen.') or name == __name__:
            del sys.modules[name]


def _std_streams():
    import io
    like_out, like_err, like_in = sys.__stdout__, sys.__stderr__, sys.__stdin__

    def text(fd, mode, like):
        raw = io.FileIO(fd, mode, closefd=False)
        if isinstance(getattr(like, 'buffer', None), io.RawIOBase):
            buffered = raw          # python -u / PYTHONUNBUFFERED: no binary buffer
        elif mode == 'w':
            buffered = io.BufferedWriter(raw)
        else:
            buffered = io.BufferedReader(raw)
        return io.TextIOWrapper(buffered, encoding=like.encoding, errors=like.errors,
                                line_buffering=like.line_buffering,
                                write_through=getattr(like, 'write_through', False))
    sys.stdin = sys.__stdin__ = text(0, 'r', like_in)
    sys.stdout = sys.__stdout__ = text(1, 'w', like_out)
    sys.stderr = sys.__stderr__ = text(2, 'w', like_err)


def _child_main(exe, env, source, cwd):
    """In the fork: become ``EXE`` reading its program from stdin, run it,
    return the exit status."""
    _close_other_fds()
    _reset_signals()
    if cwd:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    _forget_agent()
    _std_streams()
    import atexit
    atexit._clear()     # the agent's handlers are not this program's
    sys.argv = ['']
    if hasattr(sys, 'orig_argv'):
        sys.orig_argv = [exe]
    sys.executable = exe
    main = type(sys)('__main__')
    main.__file__ = '<stdin>'
    import builtins
    main.__builtins__ = builtins
    main.__loader__ = None
    main.__spec__ = None
    sys.modules['__main__'] = main
    status = 0
    try:
        code = compile(source, '<stdin>', 'exec', dont_inherit=True)
        exec(code, main.__dict__)
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException:
        # As the interpreter reports it: through sys.excepthook, without this
        # function's frame (the program's own frames start below it).
        etype, value, tb = sys.exc_info()
        tb = tb.tb_next if tb is not None else None
        try:
            value.__traceback__ = tb
            sys.excepthook(etype, value, tb)
        except BaseException:
            pass
        status = 1
    return _finish(status)


def _exit_status(e):
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xff
    try:
        sys.stderr.write('%s\n' % (code,))
    except Exception:
        pass
    return 1


def _finish(status):
    """What the interpreter does at exit: wait for threads, atexit, flush."""
    threading = sys.modules.get('threading')
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:
            pass
    import atexit
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            status = status or 120
    return status
