"""The client of the multiplexer daemon, ``mitogen-mux``.

The daemon owns every context (connection and remote agent) of this user and
outlives the processes that use them, so that Ansible's short-lived workers,
and one ``ansible-playbook`` run after another, share warm contexts. A worker
attaches, names the *connection stack* it needs, calls the context it gets back
directly (the daemon only forwards frames), and detaches::

    from mitogen_native import mux
    from mitogen_native.core import Secret

    client = mux.attach()            # starts the daemon if none is running
    ctx = client.connect([
        {'method': 'ssh', 'hostname': 'web1', 'username': 'deploy'},
        {'method': 'sudo', 'username': 'root', 'password': Secret('...')},
    ])
    ctx.call(os.getuid)
    client.detach()

A stack is a list of hop dicts, outermost first; each hop's keys are exactly
the keyword arguments of :class:`mitogen_native.master.Router`'s ``local``,
``ssh``, ``sudo``, ``su`` and ``doas`` (``via`` excepted: the previous hop is
the via) plus ``'method'``. Passwords are sent as
:class:`mitogen_native.core.Secret`. See docs/ansible.md, "The multiplexer
daemon".
"""
import atexit
import errno
import os
import shutil
import subprocess
import threading
import time
import weakref

from mitogen_native import _native
from mitogen_native import core

#: Environment variable naming the daemon's socket.
SOCKET_ENV = 'MITOGEN_MUX_SOCKET'
#: Environment variable naming the ``mitogen-mux`` program to start.
BIN_ENV = 'MITOGEN_MUX_BIN'
#: Seconds allowed for attaching, the daemon's start included.
START_TIMEOUT = 30.0

# `mitogen-mux serve --detach` exits with this when another daemon holds the lock
# (running, starting, or finishing its shutdown).
_EXIT_RUNNING = 3
# What attaching meets when no daemon listens on the socket (ECONNRESET: one
# that was dying hung up before greeting us).
_NO_DAEMON = (errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET)


def install_tag():
    """Eight hex digits naming this installation (the directory holding the
    mitogen_native package): FNV-1a of its real path, as ``mitogen-mux``
    computes it for itself."""
    site = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    h = 0x811c9dc5
    for b in os.fsencode(site):
        h = ((h ^ b) * 0x01000193) & 0xffffffff
    return '%08x' % h


def socket_path():
    """``$MITOGEN_MUX_SOCKET``, else ``mux-<install_tag()>.sock`` in the private
    directory ``$TMPDIR/mitogen-<uid>`` (created 0700 if missing; refused if it
    is not ours and private): one daemon per user and installation."""
    path = os.environ.get(SOCKET_ENV)
    if path:
        return path
    return os.path.join(core.private_tmp_dir(), 'mux-%s.sock' % install_tag())


def find_binary():
    """The ``mitogen-mux`` program: ``$MITOGEN_MUX_BIN``, the one installed
    beside this package (``mitogen_native/bin/``), else the one on ``PATH``."""
    path = os.environ.get(BIN_ENV)
    if path:
        return path
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bin', 'mitogen-mux')
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which('mitogen-mux')
    if found:
        return found
    raise core.StreamError('mitogen-mux is not installed (neither %s nor on PATH; %s names it)'
                           % (beside, BIN_ENV))


def start_daemon(path=None, timeout=START_TIMEOUT):
    """Start a daemon for socket `path` in the background (``mitogen-mux serve
    --detach``: a new session, no terminal, output to its log). Returns True
    once it listens, False if another daemon holds the socket's lock (it runs or
    is about to). Raises :class:`mitogen_native.core.StreamError` with the
    daemon's own message if it cannot start (a bad settings file, a directory
    that is not private...)."""
    path = path or socket_path()
    argv = [find_binary(), 'serve', '--detach', '--socket', path]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout, close_fds=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise core.StreamError('cannot run %s: %s' % (argv[0], e))
    if proc.returncode == 0:
        return True
    if proc.returncode == _EXIT_RUNNING:
        return False
    text = proc.stderr.decode('utf-8', 'replace').strip()
    raise core.StreamError(text or '%s exited with status %d' % (argv[0], proc.returncode))


def _attach_native(path, start, timeout):
    """An attachment to the daemon at `path`, starting one if `start` and none
    answers. Bounded by `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        left = deadline - time.monotonic()
        try:
            return _native._MuxClient.attach(path, max(0.1, left))
        except OSError as e:
            if e.errno not in _NO_DAEMON:
                raise core.StreamError('cannot attach to mitogen-mux at %s: %s' % (path, e.strerror or e))
            if not start:
                raise core.StreamError('mitogen-mux is not running (nothing listens on %s)' % (path,))
        if left <= 0:
            raise core.StreamError('mitogen-mux did not start within %.0f s (socket %s; see its log, '
                                   'mux.log in %s)' % (timeout, path, os.path.dirname(path)))
        if not start_daemon(path, max(1.0, left)):
            # Another daemon holds the lock: it is starting, or finishing its
            # shutdown (then we start the next one on the next round).
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _plain(value, key):
    """`value` with str/int/... subclasses (Ansible's AnsibleUnsafeText) made
    plain, so that it crosses the wire."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, core.Secret):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return value.decode('utf-8', 'surrogateescape')
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    raise TypeError('connection stack: %s: cannot send a %s' % (key, type(value).__name__))


def wire_stack(stack):
    """`stack` (a list of hop dicts) as sent to the daemon: plain values, and
    every password a :class:`mitogen_native.core.Secret`."""
    if isinstance(stack, (dict, str, bytes)) or not hasattr(stack, '__iter__'):
        raise TypeError('a connection stack is a list of hop dicts, not a %s' % type(stack).__name__)
    out = []
    for i, hop in enumerate(stack):
        if not isinstance(hop, dict):
            raise TypeError('connection stack: hop %d is a %s, not a dict' % (i, type(hop).__name__))
        plain = {}
        for k, v in hop.items():
            v = _plain(v, k)
            if k == 'password' and v is not None and not isinstance(v, core.Secret):
                v = core.Secret(v)
            plain[str(k)] = v
        out.append(plain)
    return out


def _request(stack):
    """What MUX_CONNECT and MUX_RESET carry: the stack, and what of this
    process's environment the daemon must use for it (docs/protocol.md)."""
    request = {'stack': wire_stack(stack),
               # Our ssh agent, not the one the daemon inherited from whoever
               # started it.
               'env': {'SSH_AUTH_SOCK': os.environ.get('SSH_AUTH_SOCK') or None}}
    if request['stack'] and request['stack'][0].get('method') == 'local':
        # A local context sees our environment, as our own children would
        # (another environment: another context).
        request['environ'] = [k + b'=' + v for k, v in os.environb.items()]
    return request


class Client(object):
    """An attachment to the daemon (see :func:`attach`). Thread-safe.

    A process forked from the one that attached never uses its parent's
    attachment: the first call in the child attaches anew (Ansible forks a worker
    per task from a process that may have attached). After :meth:`detach`, the
    next call attaches again.
    """

    def __init__(self, path=None, start=True, timeout=START_TIMEOUT):
        self.path = path or socket_path()
        self._start = start
        self._timeout = timeout
        self._lock = threading.Lock()
        self._native = _attach_native(self.path, start, timeout)
        _clients.add(self)

    def _current(self):
        with self._lock:
            native = self._native
            if native is not None and native.owner_pid != os.getpid():
                _abandon(native)
                native = None
            if native is not None and not native.connected:
                # The daemon went away (killed, or stopped): start over with a new
                # one, as the next Ansible worker would.
                native.detach()
                native = None
            if native is None:
                native = self._native = _attach_native(self.path, self._start, self._timeout)
            return native

    @property
    def context_id(self):
        """Our context id in the daemon's router."""
        return self._current().context_id

    @property
    def daemon_pid(self):
        """The daemon's process id."""
        return self._current().daemon_pid

    @property
    def router(self):
        """The Router the Contexts of this attachment are bound to."""
        return self._current().router

    def connect(self, stack, timeout=None):
        """The :class:`mitogen_native.core.Context` of `stack`: the daemon's
        context for it if it has one, else a new one (several clients asking at
        once share one attempt). Blocks until it is there.

        :raises mitogen_native.core.StreamError: it could not be started (the
            message says why: authentication, host key with its fingerprint,
            unreachable host, timeout...); :class:`mitogen_native.core.PasswordError`
            for a refused or missing sudo/su/doas password.
        :raises mitogen_native.core.ChannelError: the daemon went away.
        :raises ValueError: `stack` is not a usable connection stack.
        """
        return self._current().connect(_request(stack), timeout)

    def reset(self, stack, timeout=None):
        """Shut down the context of `stack` and every context started through
        it; the next :meth:`connect` makes new ones. Returns how many."""
        return self._current().reset(_request(stack), timeout)

    def status(self, timeout=None):
        """The daemon's state: a dict with ``pid``, ``clients``, ``rss_kib``,
        ``contexts`` (a list of dicts: ``id``, ``name``, ``stack``, ``state``,
        ``age``, ``idle``, ``uses``, ``clients``) and its settings."""
        return self._current().status(timeout)

    def stop(self, timeout=None):
        """Ask the daemon to end; its contexts shut down. Detaches."""
        self._current().stop(timeout)
        self.detach()

    def detach(self):
        """Hang up on the daemon; its contexts go on serving others. Contexts
        obtained through this attachment stop working. Idempotent."""
        with self._lock:
            native, self._native = self._native, None
        if native is None:
            return
        if native.owner_pid != os.getpid():
            _abandon(native)
        else:
            native.detach()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.detach()

    def __repr__(self):
        return 'mitogen_native.mux.Client(%r)' % (self.path,)


def attach(path=None, start=True, timeout=START_TIMEOUT):
    """Attach to the daemon listening at `path` (default :func:`socket_path`),
    starting it first if none runs and `start` is true. Returns a
    :class:`Client`.

    :raises mitogen_native.core.StreamError: no daemon, and it could not be
        started (the message says why) or `start` is false.
    """
    return Client(path, start, timeout)


def backend():
    """The daemon as the backend of the Ansible plugins (``connect``,
    ``reset``, ``detach``): a :class:`Client`, attached now, so that a daemon
    that cannot be started is reported here."""
    return Client()


# Attachments of a parent process found in a forked child: never touched again,
# never destroyed (their broker thread exists only in the parent).
_abandoned = []
_clients = weakref.WeakSet()


def _abandon(native):
    native.abandon()
    _abandoned.append(native)


def _after_fork_in_child():
    for client in list(_clients):
        # The parent's lock may have been held by one of its other threads.
        client._lock = threading.Lock()
        native, client._native = client._native, None
        if native is not None:
            _abandon(native)


def _at_exit():
    for client in list(_clients):
        try:
            client.detach()
        except Exception:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
