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
  An AnsiballZ payload runs in a fork of a *warm fork parent* instead, a
  child of this agent that imported the payload's ``ansible.module_utils.basic``
  (and what it imports) once (:class:`_WarmParent`), so a module run does not
  import and compile them again.
* Three housekeeping commands Ansible's action plugins send around a module
  (``echo ~``, the temporary directory's creation and its removal: 3-4 shell
  and ``sleep`` processes each) are done here with the same system calls
  (:func:`_builtin`), exactly when their text is what Ansible's ``sh`` shell
  plugin writes with plain paths; anything else, and any failure, runs in a
  real shell, so an error reads exactly as the shell's.
"""

import errno
import os
import select
import signal
import subprocess
import sys
import _thread

#: Shells whose ``-c BODY`` the pipelined-command parser looks into.
_SHELLS = ('sh', 'bash', 'dash', 'ash', 'ksh', 'zsh')

#: Environment names that change how an interpreter starts (stdio encoding,
#: sys.path, flags, locale): a fork of the agent could not honour a change of
#: them, so such a command gets a fresh interpreter.
_STARTUP_ENV_PREFIXES = ('PYTHON', 'LC_ALL', 'LC_CTYPE', 'LANG')

_READ_SIZE = 65536


def exec_command(cmd, in_data=None, use_tty=False, fork_ok=True, cwd=None,
                 shell=None, term=None, warm_ok=True):
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
    :param warm_ok: with `fork_ok`, allow an AnsiballZ payload to run in a
        fork of a warm fork parent (its module_utils imported already) rather
        than of the agent itself.
    """
    if isinstance(cmd, bytes):
        cmd = cmd.decode('utf-8', 'surrogateescape')
    if in_data is not None and not isinstance(in_data, bytes):
        in_data = bytes(in_data)
    if in_data is None and not use_tty:
        result = _builtin(cmd, shell)
        if result is not None:
            return result
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
            result = _run_forked(python, env_updates, in_data, cwd, via_shell, warm_ok)
            if result is not None:
                return result
    argv = [shell or _login_shell(), '-c', cmd]
    if use_tty and in_data is None:
        result = _run_with_tty(argv, cwd, term)
        if result is not None:
            return result
    return _run_piped(argv, in_data, cwd)


# ---------------------------------------------------------------------------
# Ansible's housekeeping commands, without a shell (module docstring).

import re as _re

#: A path Ansible leaves unquoted and a shell would not expand (no $, `, \,
#: spaces, globs, quotes).
_PLAIN = r'/[A-Za-z0-9_./+,@%:=-]*'
#: ShellBase.expand_user('~' or '~user') run by _low_level_execute_command.
_ECHO_HOME = _re.compile(r"^(?P<shell>/\S+) -c 'echo ~(?P<user>[_.A-Za-z0-9][-_.A-Za-z0-9]*)? "
                         r"&& sleep 0'$", _re.ASCII)
#: ShellBase.mkdtemp(mode=0o700) (the umask in a subshell; mkdir -p the base).
_MKDTEMP = _re.compile(r"^(?P<shell>/\S+) -c '\( umask (?P<umask>[0-7]{1,4}) && "
                       r'mkdir -p "` echo (?P<base>%s) `"&& '
                       r'mkdir "` echo (?P<tmp>%s) `" && '
                       r'echo (?P<name>[A-Za-z0-9_.+,@%%:-]+)="` echo (?P=tmp) `" \) '
                       r"&& sleep 0'$" % (_PLAIN, _PLAIN), _re.ASCII)
#: ShellBase.remove(path, recurse=True).
_RM_TREE = _re.compile(r"^(?P<shell>/\S+) -c 'rm -f -r (?P<path>%s) > /dev/null 2>&1 "
                       r"&& sleep 0'$" % _PLAIN, _re.ASCII)


def _builtin(cmd, shell=None):
    """``(rc, stdout, stderr)`` of `cmd` done without a shell, or None: run
    it in a shell (not one of the three commands, an unusual form, a login
    shell or named shell that is not a POSIX shell, or a failure)."""
    if not cmd.endswith("&& sleep 0'"):
        return None
    m = _ECHO_HOME.match(cmd) or _MKDTEMP.match(cmd) or _RM_TREE.match(cmd)
    if m is None:
        return None
    login = shell or _login_shell()
    if os.path.basename(login) not in _SHELLS or \
            os.path.basename(m.group('shell')) not in _SHELLS or \
            not os.access(m.group('shell'), os.X_OK):
        return None
    try:
        if m.re is _ECHO_HOME:
            return _echo_home(m.group('user'))
        if m.re is _MKDTEMP:
            return _mkdtemp(int(m.group('umask'), 8), m.group('base'), m.group('tmp'),
                            m.group('name'))
        return _rm_tree(m.group('path'))
    except OSError:
        return None


def _echo_home(user):
    """``echo ~`` / ``echo ~user``: what the shell's tilde expansion prints."""
    import pwd
    if user:
        try:
            home = pwd.getpwnam(user).pw_dir
        except KeyError:
            home = '~' + user           # no such user: the word stays as it is
    elif 'HOME' in os.environ:
        home = os.environ['HOME']
    else:
        home = pwd.getpwuid(os.getuid()).pw_dir
    return 0, os.fsencode(home) + b'\n', b''


def _current_umask():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    raise OSError(errno.ENOSYS, 'no Umask in /proc/self/status')


def _mkdir(path, mode, umask):
    """mkdir(2) with `mode` under the process umask, then the bits that umask
    took away given back (only then: chmod would also rewrite an ACL mask)."""
    os.mkdir(path, mode)
    if mode & umask:
        os.chmod(path, mode)


def _mkdtemp(umask, base, tmp, name):
    if tmp != os.path.join(base, name) or '/' in name:
        return None
    mode = 0o777 & ~umask
    current = _current_umask()
    # mkdir -p: the missing parents get u+wx besides, the last one `mode`.
    missing, p = [], os.path.normpath(base)
    while not os.path.isdir(p):
        if os.path.lexists(p):
            return None                 # a file in the way: the shell says so
        missing.append(p)
        p = os.path.dirname(p)
    for i, d in enumerate(reversed(missing)):
        last = i == len(missing) - 1
        _mkdir(d, mode if last else mode | 0o300, current)
    _mkdir(tmp, mode, current)          # exists already: the shell says so
    return 0, os.fsencode('%s=%s\n' % (name, tmp)), b''


def _rm_tree(path):
    """``rm -f -r PATH > /dev/null 2>&1``: nothing there is success; a
    symbolic link or a file is left to rm."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0, b'', b''
    import stat
    if not stat.S_ISDIR(st.st_mode):
        return None
    import shutil
    shutil.rmtree(path)
    return 0, b'', b''


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


#: What tempfile.gettempdir() depends on besides the file system.
_TEMP_ENV_NAMES = ('TMPDIR', 'TEMP', 'TMP')
#: Their values in this agent, whose tempfile module may have chosen (and
#: cached) its temporary directory with them, which its forks inherit.
_temp_env = tuple(os.environ.get(name) for name in _TEMP_ENV_NAMES)

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


def _run_forked(python, env_updates, in_data, cwd, via_shell='/bin/sh', warm_ok=True):
    """Run the Python program `in_data` as ``PYTHON < in_data`` would, in a
    fork of this process, or of a warm fork parent when `in_data` is an
    AnsiballZ payload (:func:`_warm_parent_for`). Returns None (the caller
    then starts a real process) when PYTHON is not this interpreter or the
    environment changes something only a fresh interpreter can apply."""
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

    waited = None
    if warm_ok:
        parent = _warm_parent_for(in_data, env)
        if parent is not None:
            waited = parent.run(exe, env, in_data, cwd)
    if waited is None:
        waited = _cold_fork(exe, env, in_data, cwd)
    stdout, stderr, wstatus = waited
    if os.WIFSIGNALED(wstatus):
        sig = os.WTERMSIG(wstatus)
        rc = 128 + sig
        if via_shell:
            stderr += _shell_signal_note(via_shell, sig, os.WCOREDUMP(wstatus))
    else:
        rc = os.WEXITSTATUS(wstatus)
    return rc, stdout, stderr


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _cold_fork(exe, env, in_data, cwd):
    """Run the program in a fork of this agent: (stdout, stderr, wait status)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    os.close(in_w)    # the interpreter read its program from stdin: stdin is at EOF
    _flush_std_streams()
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
    return stdout, stderr, wstatus


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


def _close_other_fds(keep=()):
    try:
        fds = [int(x) for x in os.listdir('/proc/self/fd')]
    except (OSError, ValueError):
        low = 3
        for fd in sorted(keep):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 65536)
        return
    for fd in fds:
        if fd > 2 and fd not in keep:
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


def _prepare_child(warm=None):
    """In a fork, the part of becoming a fresh interpreter that does not
    depend on the program: signal dispositions, the agent's modules and
    atexit handlers gone, a new ``__main__`` and ``sys.argv``, and (in a fork
    of a warm parent) where the warm modules hold the objects a fork
    replaces. Returns what :func:`_child_main` needs."""
    old = [sys.modules.get('__main__'), sys.argv, sys.stdin, sys.stdout, sys.stderr,
           sys.__stdin__, sys.__stdout__, sys.__stderr__]
    _reset_signals()
    _forget_agent()
    import atexit
    atexit._clear()     # the agent's handlers are not this program's
    sys.argv = ['']
    main = type(sys)('__main__')
    main.__file__ = '<stdin>'
    import builtins
    main.__builtins__ = builtins
    main.__loader__ = None
    main.__spec__ = None
    sys.modules['__main__'] = main
    places = warm.find(old) if warm is not None else None
    return old, main, places


def _child_main(exe, env, source, cwd, warm=None, prepared=None):
    """In the fork: become ``EXE`` reading its program from stdin, run it,
    return the exit status. `warm`: the :class:`_WarmImports` of the warm
    fork parent this is a fork of, if any; `prepared`: what
    :func:`_prepare_child` returned, if it ran already (in a spare, whose
    descriptors other than 0-2 are closed already)."""
    if prepared is None:
        _close_other_fds()
        prepared = _prepare_child(warm)
    old, main, places = prepared
    if cwd:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile = sys.modules.get('tempfile')
    if tempfile is not None and tuple(env.get(n) for n in _TEMP_ENV_NAMES) != _temp_env:
        # The directory the agent chose is not the one this environment names:
        # choose again, as a fresh interpreter would.
        tempfile.tempdir = None
    _std_streams()
    if hasattr(sys, 'orig_argv'):
        sys.orig_argv = [exe]
    sys.executable = exe
    if places is not None:
        warm.assign(places, [main, sys.argv, sys.stdin, sys.stdout, sys.stderr,
                             sys.__stdin__, sys.__stdout__, sys.__stderr__])
    status = 0
    try:
        # (compiled here: a syntax error's traceback starts below this frame)
        code = _compile_ansiballz(source) or compile(source, '<stdin>', 'exec',
                                                     dont_inherit=True)
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


#: The characters of base64 text (what an AnsiballZ wrapper's ZIPDATA holds).
_BASE64_CHARS = b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/='


def _compile_ansiballz(source):
    """``compile(source, '<stdin>', 'exec')`` of an AnsiballZ program, or None
    (another program, or a syntax error: compile the source as it is). Most of the source is
    the string literal of its base64 zip (``ZIPDATA = \"\"\"...\"\"\"``), which
    the compiler would scan character by character: it compiles the program
    with a short placeholder in the literal instead and puts the real text in
    the code's constants, the same value the literal has (base64 holds no
    escapes nor newlines, so the lines and the bytecode are the same; only the
    column where that literal ends differs, which no traceback can show: the
    assignment of a constant does not fail)."""
    start = source.find(_ZIPDATA_OPEN) if _ANSIBALLZ_MARK in source[:4096] else -1
    if start >= 0:
        start += len(_ZIPDATA_OPEN)
        end = source.find(b'"""', start)
        data = source[start:end] if end >= 0 else b''
        placeholder = b'mitogen-native-zipdata-placeholder'
        if len(data) > 4096 and not data.translate(None, _BASE64_CHARS) and placeholder not in source:
            import warnings
            try:
                # A warning (or an error) is left to the real compile, which
                # gives it as a fresh interpreter does, once.
                with warnings.catch_warnings():
                    warnings.simplefilter('error')
                    code = compile(source[:start] + placeholder + source[end:], '<stdin>',
                                   'exec', dont_inherit=True)
            except Exception:
                pass
            else:
                swapped = _with_constant(code, placeholder.decode(), data.decode('ascii'))
                if swapped[1] == 1:
                    return swapped[0]
    return None


def _with_constant(code, old, new):
    """(`code` with the str constant `old` replaced by `new` in it and the
    code nested in it, how many constants were replaced)."""
    consts, n = [], 0
    for c in code.co_consts:
        if isinstance(c, type(code)):
            c, k = _with_constant(c, old, new)
            n += k
        elif type(c) is str and c == old:
            c = new
            n += 1
        consts.append(c)
    if not n:
        return code, 0
    return code.replace(co_consts=tuple(consts)), n


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


# ---------------------------------------------------------------------------
# Warm fork parents: AnsiballZ module runs that do not import module_utils.
#
# Every AnsiballZ payload carries a zip of the module and the module_utils it
# needs, and its wrapper imports ``ansible.module_utils.basic`` from it before
# the module: most of a module run's time on a warm agent (zipimport compiles
# every file from source). A warm fork parent is a child of this agent that
# imported those modules once, from a copy of one payload's zip kept in a
# private directory (mkdtemp: mode 0700), and then forks once per module run.
# A payload may use a warm parent only if it would have imported the very same
# code: every zip entry the warm import read (and every one it looked for and
# did not find) must be byte-identical in (or equally absent from) the new
# payload, no new top-level name of the payload may shadow a module the parent
# holds, and every environment variable the import read must have the same
# value. Anything else forks this agent as before (a "cold" fork). In the fork,
# the warm packages' __path__ point at the new payload's zip (once the wrapper
# has put it on sys.path), so what is not warm comes from the new payload.
# Between runs a warm parent compiles the payload's other files, and its forks
# take that code instead of compiling the same source (_CodeCache).
#
# The parent is a separate process rather than this agent so that the agent's
# own interpreter never holds `ansible` (a call into the agent that imports
# ansible gets its own), and forks come from a small single-threaded process.

_ANSIBALLZ_MARK = b'_ANSIBALLZ_WRAPPER = True'
_ZIPDATA_OPEN = b'ZIPDATA = """'
_BASIC_ENTRY = 'ansible/module_utils/basic.py'
#: What a warm parent imports from its payload (with all they import): the
#: AnsiballZ wrapper imports it before every module.
_WARM_IMPORTS = ('ansible.module_utils.basic',)
#: Standard-library modules the AnsiballZ wrapper imports before it puts its
#: zip on sys.path (so no payload can shadow them).
_WARM_STDLIB = ('base64', 'runpy', 'shutil', 'tempfile', 'zipfile')
_MAX_WARM_PARENTS = 3
#: Seconds a warm parent may take to import; then it is given up.
_WARM_START_TIMEOUT = 120
_MAX_PAYLOADS = 16

_warm_lock = _thread.allocate_lock()
_warm_parents = []       # _WarmParent, most recently used first
_payloads = []           # (key, digests, tops), most recently used first
_warm_failed = {}        # payload key -> why its warm import failed
_zombies = []            # pids of retired warm parents, not reaped yet
_warm_errors = []        # the last few unexpected errors (warm_parents())


def warm_parents():
    """This agent's warm fork parents, most recently used first, as dicts
    (``pid``, ``directory``, ``zip``, ``modules``, ``uses``, ``compiled``,
    ``env_reads``), then one more dict saying why warm imports failed or were
    refused (``failed``) and the last unexpected errors (``errors``). For
    tests and troubleshooting."""
    out = []
    for p in _warm_parents:
        out.append({'pid': p.pid, 'directory': p.directory, 'zip': p.zip_path,
                    'modules': list(p.modules), 'uses': p.uses, 'compiled': p.compiled,
                    'env_reads': dict(p.env_reads or {})})
    out.append({'failed': sorted(_warm_failed.values()), 'errors': list(_warm_errors)})
    return out


def stop_warm_parents():
    """End every warm fork parent of this agent; returns how many there were."""
    with _warm_lock:
        parents = list(_warm_parents)
        for p in parents:
            p.retire()
        _reap_zombies()
    return len(parents)


def _note_error(text):
    _warm_errors.append(text)
    del _warm_errors[:-5]


def _ansiballz_payload(source):
    """(key, {zip entry: digest}, top-level names, base64 text) of an
    AnsiballZ program, or None. Digests cover the compression method and the
    stored bytes: equal digests mean byte-identical content."""
    if _ANSIBALLZ_MARK not in source[:4096]:
        return None
    start = source.find(_ZIPDATA_OPEN)
    if start < 0:
        return None
    start += len(_ZIPDATA_OPEN)
    end = source.find(b'"""', start)
    if end < 0:
        return None
    import hashlib
    b64 = source[start:end]
    key = hashlib.sha256(b64).digest()
    for n, item in enumerate(_payloads):
        if item[0] == key:
            if n:
                del _payloads[n]
                _payloads.insert(0, item)
            return item + (b64,)
    import binascii
    try:
        digests = _zip_digests(binascii.a2b_base64(b64))
    except Exception as e:    # not a zip we understand: no warm parent
        _note_error('payload zip: %s: %s' % (type(e).__name__, e))
        return None
    tops = frozenset(_top_name(name) for name in digests)
    item = (key, digests, tops)
    _payloads.insert(0, item)
    del _payloads[_MAX_PAYLOADS:]
    return item + (b64,)


def _top_name(entry):
    first = entry.split('/', 1)[0]
    if '/' not in entry:
        first = first.split('.', 1)[0]    # a top-level module file
    return first


def _zip_digests(data):
    import hashlib
    import io
    import struct
    import zipfile
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            offset = info.header_offset
            header = data[offset:offset + 30]
            if len(header) != 30 or header[:4] != b'PK\x03\x04':
                raise ValueError('bad local header for %s' % (info.filename,))
            name_len, extra_len = struct.unpack('<HH', header[26:30])
            begin = offset + 30 + name_len + extra_len
            stored = data[begin:begin + info.compress_size]
            if len(stored) != info.compress_size:
                raise ValueError('truncated entry %s' % (info.filename,))
            h = hashlib.sha256(b'%d:%d:' % (info.compress_type, info.flag_bits & 1))
            h.update(stored)
            out[info.filename] = h.hexdigest()
    return out


def _warm_parent_for(source, env):
    """The warm fork parent that may run the AnsiballZ program `source` with
    environment `env` (started now if no parent holds this payload's code),
    or None: then the program runs in a fork of the agent."""
    if not _warm_lock.acquire(False):
        return None
    try:
        _reap_zombies()
        payload = _ansiballz_payload(source)
        if payload is None:
            return None
        key, digests, tops, b64 = payload
        for p in list(_warm_parents):
            if not p.alive():
                p.retire()
            elif p.holds(digests, tops):
                if not p.env_ok(env):
                    return None   # the same code, imported under other values
                _warm_parents.remove(p)
                _warm_parents.insert(0, p)
                return p
        if _BASIC_ENTRY not in digests or key in _warm_failed:
            return None
        p = _WarmParent.start(key, b64, digests, env)
        if p is None:
            return None
        _warm_parents.insert(0, p)
        for old in _warm_parents[_MAX_WARM_PARENTS:]:
            old.retire()
        return p
    except Exception as e:
        _note_error('%s: %s' % (type(e).__name__, e))
        return None
    finally:
        _warm_lock.release()


def _reap_zombies():
    for pid in list(_zombies):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _zombies.remove(pid)


#: Warm parents' directories: PREFIX + the agent's pid + '-' + random.
_DIR_PREFIX = 'mitogen-warm-'


def _remove_stale_directories(tmp):
    """Remove the directories of warm parents whose agent is gone: a warm
    parent removes its own when it exits, but not when it is killed
    (SIGKILL to a whole process tree, a crash)."""
    import stat
    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        pid = name[len(_DIR_PREFIX):].split('-', 1)[0]
        if not pid.isdigit():
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
            continue            # its agent lives
        except ProcessLookupError:
            pass
        except OSError:
            continue            # someone's process: not ours to judge
        _remove_tree(path)


def _remove_tree(directory):
    """Remove the warm parent's directory (only files: the zip)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    try:
        os.rmdir(directory)
    except OSError:
        pass


class _WarmParent(object):
    """The agent's handle on one warm fork parent (a child process)."""

    def __init__(self, pid, sock, directory, zip_path, requires, tops, loaded_tops,
                 env_reads, env_all, modules):
        self.pid = pid
        self.sock = sock
        self.directory = directory
        self.zip_path = zip_path
        self.requires = requires         # zip entry -> digest, None: must be absent
        self.tops = tops                 # top-level names of its payload
        self.loaded_tops = loaded_tops   # top-level names of its sys.modules
        self.env_reads = env_reads       # name -> value (None: unset) read by the import
        self.env_all = env_all           # the whole environment, if the import read it all
        self.modules = modules
        self.uses = 0
        self.compiled = 0        # files its code cache held at the last run
        self.lock = _thread.allocate_lock()
        self.reaped = False      # its exit status was collected
        self.retired = False     # its socket was closed

    @classmethod
    def start(cls, key, b64, digests, env):
        import binascii
        import socket
        import tempfile
        data = binascii.a2b_base64(b64)
        _remove_stale_directories(tempfile.gettempdir())
        directory = tempfile.mkdtemp(prefix='%s%d-' % (_DIR_PREFIX, os.getpid()))
        zip_path = os.path.join(directory, 'modlib.zip')
        fd = os.open(zip_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        ours, theirs = socket.socketpair()
        _flush_std_streams()
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                # Socket objects whose descriptors the parent closes must
                # never close a reused number later.
                ours.detach()
                for other in _warm_parents:
                    other.sock.detach()
                status = _warm_server(theirs, zip_path, directory, env)
            finally:
                os._exit(status)
        theirs.close()
        try:
            ours.settimeout(_WARM_START_TIMEOUT)
            hello, _ = _recv_msg(ours)
            ours.settimeout(None)
        except (OSError, EOFError, ValueError, TypeError) as e:
            hello = ('failed', 'no answer from the warm parent: %s' % (e,))
        if hello[0] != 'ready':
            ours.close()
            if hello[1].startswith('no answer'):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            _waitpid(pid)
            _remove_tree(directory)
            _warm_failed[key] = str(hello[1])
            while len(_warm_failed) > _MAX_PAYLOADS:
                del _warm_failed[next(iter(_warm_failed))]
            return None
        _, required, loaded_tops, env_reads, env_all, modules = hello
        requires = dict((name, digests.get(name)) for name in required)
        tops = frozenset(_top_name(name) for name in digests)
        return cls(pid, ours, directory, zip_path, requires, tops, frozenset(loaded_tops),
                   env_reads, env_all, modules)

    def holds(self, digests, tops):
        """True if a payload with these entries would import, from its own
        zip, exactly the code this parent imported."""
        for name, digest in self.requires.items():
            if digests.get(name) != digest:
                return False
        for top in tops - self.tops:
            if top in self.loaded_tops:
                return False      # the payload would shadow a module we hold
        return True

    def env_ok(self, env):
        if self.env_all is not None:
            return env == self.env_all
        for name, value in self.env_reads.items():
            if env.get(name) != value:
                return False
        return True

    def alive(self):
        if not self.reaped:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done = self.pid
            self.reaped = bool(done)
        return not self.reaped and not self.retired

    def retire(self):
        """Let the parent go: it exits at end of file on its socket and
        removes its directory (which we remove if it is gone already)."""
        if self in _warm_parents:
            _warm_parents.remove(self)
        if not self.retired:
            self.retired = True
            try:
                self.sock.close()
            except OSError:
                pass
            self.alive()
            if not self.reaped:
                _zombies.append(self.pid)
        if self.reaped:
            _remove_tree(self.directory)

    def run(self, exe, env, source, cwd):
        """Run `source` in a fork of this parent: (stdout, stderr, wait
        status), or None if it could not be started (nothing ran)."""
        if not self.lock.acquire(False):
            return None
        try:
            return self._run(exe, env, source, cwd)
        finally:
            self.lock.release()

    def _run(self, exe, env, source, cwd):
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            try:
                _send_msg(self.sock, (exe, env, cwd, source), (out_w, err_w))
            finally:
                os.close(out_w)
                os.close(err_w)
            reply, _ = _recv_msg(self.sock)
        except (OSError, EOFError, ValueError, TypeError) as e:
            reply = ('failed', str(e))
        if reply[0] == 'started':
            self.compiled = reply[2]
        else:
            os.close(out_r)
            os.close(err_r)
            _note_error('warm parent %d: %s' % (self.pid, reply[1]))
            with _warm_lock:
                self.retire()
            return None
        stdout, stderr = _drain(out_r, err_r)
        try:
            reply, _ = _recv_msg(self.sock)
        except (OSError, EOFError, ValueError, TypeError) as e:
            reply = ('failed', str(e))
        if reply[0] != 'exited':
            with _warm_lock:
                self.retire()
            stderr += (b'mitogen-native: the warm fork parent of this module died '
                       b'while it ran; its exit status is unknown\n')
            return stdout, stderr, 255 << 8
        self.uses += 1
        return stdout, stderr, reply[1]


# -- the wire between the agent and a warm parent: a length, then marshal ----

def _send_msg(sock, obj, fds=()):
    import array
    import marshal
    import socket
    import struct
    body = marshal.dumps(obj)
    head = struct.pack('>I', len(body))
    if fds:
        sock.sendmsg([head], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               array.array('i', fds).tobytes())])
    else:
        sock.sendall(head)
    sock.sendall(body)


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError('end of file')
        buf += chunk
    return bytes(buf)


def _recv_msg(sock, nfds=0):
    """(object, [received descriptors]); EOFError at end of file."""
    import array
    import marshal
    import socket
    import struct
    fds = []
    if nfds:
        data, ancillary, _, _ = sock.recvmsg(4, socket.CMSG_SPACE(nfds * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array('i')
                a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
    else:
        data = sock.recv(4)
    try:
        if not data:
            raise EOFError('end of file')
        data += _recv_exact(sock, 4 - len(data))
        body = _recv_exact(sock, struct.unpack('>I', data)[0])
        return marshal.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# -- inside a warm parent -----------------------------------------------------

def _warm_server(sock, zip_path, directory, env):
    """The warm parent's life: import, say what was imported, then keep one
    *spare* fork waiting for the next request (:func:`_spare_main`), and fork
    the next spare once the last one's run has ended, until the agent closes
    the socket (or dies)."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            if null != fd:
                os.dup2(null, fd)
        _close_other_fds(keep=(sock.fileno(),))
        _reset_signals()
        _forget_agent()
        import atexit
        atexit._clear()
        ok, info = _warm_import(zip_path, env)
        if not ok:
            _send_msg(sock, ('failed', info))
            return 0
        required, loaded_tops, env_reads, env_all, imported = info
        _send_msg(sock, ('ready', required, loaded_tops, env_reads, env_all,
                         sorted(imported)))
        warm = _WarmImports(zip_path, imported)
        while True:
            pid, channel = _fork_spare(sock, warm)
            if not _await_spare(sock, pid, channel, warm):
                return 0
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return 0
    finally:
        _remove_tree(directory)


def _fork_spare(sock, warm):
    """Fork the spare that will serve the next request: (pid, the parent's
    end of its private channel)."""
    import socket
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            ours.detach()    # closed with the other descriptors
            status = _spare_main(sock, theirs, warm)
        finally:
            os._exit(status)
    theirs.close()
    return pid, ours


def _await_spare(sock, pid, channel, warm):
    """In the warm parent: wait until the spare `pid` took a request, then
    for the end of the run it became; tell the agent its wait status and
    compile what the next run of its module will need. False: the parent
    ends (the agent closed the socket, or the spare died without saying it
    read a whole request: the socket's stream may then be cut mid-message)."""
    try:
        msg, _ = _recv_msg(channel)
    except (OSError, EOFError, ValueError, TypeError):
        msg = ('gone',)
    finally:
        channel.close()
    if msg[0] == 'bad':             # a malformed request, answered by the spare
        _waitpid(pid)
        return True
    if msg[0] != 'taken':
        try:
            os.kill(pid, signal.SIGKILL)    # not reaped yet: still our child's pid
        except OSError:
            pass
        _waitpid(pid)
        return False
    _, wstatus = _waitpid(pid)
    _send_msg(sock, ('exited', wstatus))
    # While the agent reads the result, and before the next spare is forked:
    # compile what the next run of this module will need.
    warm.codes.learn(msg[1])
    return True


def _spare_main(sock, channel, warm):
    """A fork of the warm parent, made before its request exists: it does
    what does not depend on the request (:func:`_prepare_child`), then reads
    the next request from the agent's socket itself, tells the parent it took
    it (with the program, for the code cache), answers ``started`` and runs
    the program as :func:`_child_main`. Returns the exit status."""
    _close_other_fds(keep=(sock.fileno(), channel.fileno()))
    prepared = _prepare_child(warm)
    try:
        request, fds = _recv_msg(sock, 2)
    except EOFError:
        return 0        # the agent closed the socket: the parent ends too
    if len(fds) != 2 or len(request) != 4:
        for fd in fds:
            os.close(fd)
        _send_msg(channel, ('bad',))
        _send_msg(sock, ('failed', 'expected 2 descriptors, got %d' % len(fds)))
        return 0
    exe, env, cwd, source = request
    _send_msg(channel, ('taken', source))
    channel.close()
    _send_msg(sock, ('started', os.getpid(), len(warm.codes.codes)))
    sock.close()
    out_w, err_w = fds
    in_r, in_w = os.pipe()
    os.close(in_w)       # the interpreter read its program from stdin: at EOF
    os.dup2(in_r, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    return _child_main(exe, env, source, cwd, warm, prepared)


class _ImportRecorder(object):
    """A meta path finder that only notes which names were looked for."""

    def __init__(self):
        self.names = []

    def find_spec(self, name, path=None, target=None):
        self.names.append(name)
        return None


def _recording_environ(base, reads, flags):
    """A subclass of os.environ's class that notes what is read or written."""
    class RecordingEnviron(base):
        def __getitem__(self, key):
            reads.add(key)
            return base.__getitem__(self, key)

        def __iter__(self):
            flags['all'] = True
            return base.__iter__(self)

        def __setitem__(self, key, value):
            flags['wrote'] = True
            return base.__setitem__(self, key, value)

        def __delitem__(self, key):
            flags['wrote'] = True
            return base.__delitem__(self, key)
    return RecordingEnviron


def _candidates(name):
    """The zip entries that could provide module `name`."""
    path = name.replace('.', '/')
    return (path + '.py', path + '.pyc', path + '/__init__.py',
            path + '/__init__.pyc', path + '/')


def _warm_import(zip_path, env):
    """Import _WARM_IMPORTS from the zip at `zip_path` as the AnsiballZ wrapper
    would (zip first on sys.path, argv [''], a fresh __main__, the program's
    environment), then put sys.path and the environment back.
    Returns (True, (entries the import depends on, top-level names loaded,
    environment read, whole environment if it was all read, {name: module
    from the zip})) or (False, why)."""
    import builtins
    for name in _WARM_STDLIB:
        try:
            __import__(name)
        except ImportError:
            pass
    import zipfile
    with zipfile.ZipFile(zip_path) as zf:
        tops = set(_top_name(n) for n in zf.namelist())
    held = sorted(t for t in tops if t in sys.modules)
    if held:
        return False, 'the payload would shadow modules already loaded: %s' % (
            ', '.join(held),)
    before = set(sys.modules)
    saved_env = dict(os.environ)
    saved_path = list(sys.path)
    recorder = _ImportRecorder()
    reads = set()
    flags = {}
    environ_class = type(os.environ)
    main = type(sys)('__main__')
    main.__file__ = '<stdin>'
    main.__builtins__ = builtins
    main.__loader__ = None
    main.__spec__ = None
    error = None
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ['']
    sys.modules['__main__'] = main
    sys.path[:] = [zip_path] + [p for p in saved_path if p not in ('', '.')]
    sys.meta_path.insert(0, recorder)
    # What the import prints (a warning, say) would be part of a fresh run's
    # output, which no fork of ours would repeat: such a payload is not warmed.
    capture_path = os.path.join(os.path.dirname(zip_path), 'import.out')
    capture = os.open(capture_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.dup2(capture, 1)
    os.dup2(capture, 2)
    os.environ.__class__ = _recording_environ(environ_class, reads, flags)
    try:
        for name in _WARM_IMPORTS:
            __import__(name)
    except BaseException as e:
        error = 'importing %s from the payload failed: %s: %s' % (
            name, type(e).__name__, e)
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
        printed = os.lseek(capture, 0, os.SEEK_END)
        os.close(capture)
        os.unlink(capture_path)
        os.environ.__class__ = environ_class
        sys.meta_path.remove(recorder)
        sys.path[:] = saved_path
        os.environ.clear()
        os.environ.update(saved_env)
        # argv and __main__ stay: what the modules bound at import time are
        # the objects each fork replaces (_WarmImports.find).
    if error is None and flags.get('wrote'):
        error = 'importing %s changed the environment' % (', '.join(_WARM_IMPORTS),)
    if error is None and printed:
        error = 'importing %s wrote %d bytes of output' % (', '.join(_WARM_IMPORTS), printed)
    if error is not None:
        return False, error
    prefix = zip_path + os.sep
    imported = {}
    for name in set(sys.modules) - before:
        module = sys.modules.get(name)
        if (getattr(module, '__file__', None) or '').startswith(prefix):
            imported[name] = module
    required = set()
    for name in list(recorder.names) + list(imported):
        if name.split('.', 1)[0] in tops:
            required.update(_candidates(name))
    loaded_tops = sorted(set(n.split('.', 1)[0] for n in sys.modules))
    if flags.get('all'):
        return True, (sorted(required), loaded_tops, None, dict(env), imported)
    env_reads = dict((k, env.get(k)) for k in reads if isinstance(k, str))
    return True, (sorted(required), loaded_tops, env_reads, None, imported)


class _WarmImports(object):
    """In a warm parent: the modules it imported from its zip. In each fork,
    :meth:`find` and :meth:`assign` point them at what the fork replaced (its __main__, argv,
    standard streams) and their packages' __path__ at the new payload."""

    def __init__(self, zip_path, modules):
        self.zip_path = zip_path
        self.modules = modules
        self.pristine = frozenset(p for p in sys.path if isinstance(p, str))
        self.roots = {}
        self.codes = _CodeCache(zip_path, modules)

    def find(self, old):
        """In a fork, before its program is known: where the warm modules
        hold one of the objects in `old` (the fork's replaced __main__, argv,
        standard streams), for :meth:`assign`; and the warm packages'
        __path__ made to follow the new payload."""
        index = dict((id(o), i) for i, o in enumerate(old) if o is not None)
        places = []
        for module in self.modules.values():
            namespace = module.__dict__
            for key, value in namespace.items():
                i = index.get(id(value))
                if i is not None:
                    places.append((namespace, key, i))
        prefix = self.zip_path + os.sep
        for module in self.modules.values():
            path = getattr(module, '__path__', None)
            if path is not None and any(isinstance(e, str) and e.startswith(prefix)
                                        for e in path):
                module.__path__ = _PayloadPath(module, path, self)
        return places

    @staticmethod
    def assign(places, new):
        """Point the places :meth:`find` found at the fork's new objects."""
        for namespace, key, i in places:
            namespace[key] = new[i]

    def root(self, top):
        """The sys.path entry that provides package `top` in this fork (the
        new payload's zip, once the wrapper put it there), or None."""
        root = self.roots.get(top)
        if root is None:
            from importlib.machinery import PathFinder
            for entry in sys.path:
                if not isinstance(entry, str) or entry in self.pristine or \
                        entry == self.zip_path:
                    continue
                try:
                    spec = PathFinder.find_spec(top, [entry])
                except Exception:
                    spec = None
                if spec is not None:
                    root = self.roots[top] = entry
                    break
        return root

    def translate(self, top, entries):
        root = self.root(top)
        if root is None:
            return None
        warm, prefix = self.zip_path, self.zip_path + os.sep
        return [root + e[len(warm):] if isinstance(e, str) and (e == warm or e.startswith(prefix))
                else e for e in entries]


class _CodeCache(object):
    """Compiled code of the payload files a warm parent did not import (the
    module itself, other module_utils), keyed by the SHA-256 of their source,
    so that a fork compiles only what no earlier payload had (zipimport
    compiles every file from source otherwise: most of a small module's run).
    The parent compiles after a run, between requests; a fork's zipimport
    takes the cached code, with its file name set to the path it would have
    compiled it under. Python 3.8+ (zipimport in Python, code.replace)."""

    MAX_ENTRIES = 512
    BUDGET = 0.1     # seconds of compiling after one run

    def __init__(self, zip_path, modules):
        self.codes = {}
        self.learned = set()        # payload keys whose files were all seen
        self.skip = set()           # digests not to compile (warm, or bad source)
        self.compile = None
        import zipimport
        original = getattr(zipimport, '_compile_source', None)
        if original is None or not hasattr(type(_CodeCache.__init__.__code__), 'replace'):
            return
        import hashlib
        import zipfile
        prefix = zip_path + os.sep
        with zipfile.ZipFile(zip_path) as zf:
            for module in modules.values():   # never compiled again in a fork
                entry = module.__file__[len(prefix):].replace(os.sep, '/')
                try:
                    self.skip.add(hashlib.sha256(zf.read(entry)).digest())
                except KeyError:
                    pass
        self.compile = original
        codes = self.codes

        def _compile_source(pathname, source):
            code = codes.get(hashlib.sha256(source).digest())
            if code is None:
                return original(pathname, source)
            return _renamed(code, pathname)
        zipimport._compile_source = _compile_source

    def learn(self, source):
        if self.compile is None or _ANSIBALLZ_MARK not in source[:4096]:
            return
        start = source.find(_ZIPDATA_OPEN)
        end = source.find(b'"""', start + len(_ZIPDATA_OPEN)) if start >= 0 else -1
        if end < 0:
            return
        import binascii
        import hashlib
        import io
        import zipfile
        b64 = source[start + len(_ZIPDATA_OPEN):end]
        key = hashlib.sha256(b64).digest()
        if key in self.learned:
            return
        try:
            zf = zipfile.ZipFile(io.BytesIO(binascii.a2b_base64(b64)))
            names = [n for n in zf.namelist() if n.endswith('.py')]
        except Exception:
            self.learned.add(key)
            return
        # A request that comes meanwhile waits at most BUDGET: compiling here
        # is work the next fork of this module would do anyway.
        import time
        deadline = time.monotonic() + self.BUDGET
        for name in names:
            data = zf.read(name)
            digest = hashlib.sha256(data).digest()
            if digest in self.codes or digest in self.skip:
                continue
            if time.monotonic() > deadline:
                return          # the rest after the next run
            try:
                self.codes[digest] = self.compile('<warm>', data)
            except Exception:
                self.skip.add(digest)   # the run that imports it reports the error
            while len(self.codes) > self.MAX_ENTRIES:
                del self.codes[next(iter(self.codes))]
        self.learned.add(key)


def _renamed(code, filename):
    """`code` (and the code objects nested in it) as compiled under `filename`."""
    consts = tuple(_renamed(c, filename) if isinstance(c, type(code)) else c
                   for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


class _PayloadPath(list):
    """A warm package's __path__ in a fork of the warm parent: on first use
    (the AnsiballZ wrapper puts its zip on sys.path only when it runs), the
    warm zip's locations are replaced by the new payload's, and the package's
    __path__ becomes that plain list."""

    def __init__(self, module, entries, warm):
        list.__init__(self, entries)
        self._module = module
        self._warm = warm
        self._done = False

    def _resolve(self):
        if not self._done:
            top = self._module.__name__.split('.', 1)[0]
            new = self._warm.translate(top, list.__iter__(self))
            if new is not None:
                self._done = True
                list.__setitem__(self, slice(None), new)
                self._module.__path__ = new
                spec = getattr(self._module, '__spec__', None)
                locations = getattr(spec, 'submodule_search_locations', None)
                if locations is not None:
                    spec.submodule_search_locations = self._warm.translate(top, locations)
        return self

    def __iter__(self):
        return list.__iter__(self._resolve())

    def __len__(self):
        return list.__len__(self._resolve())

    def __getitem__(self, index):
        return list.__getitem__(self._resolve(), index)

    def __contains__(self, item):
        return list.__contains__(self._resolve(), item)

    def __repr__(self):
        return list.__repr__(self._resolve())
