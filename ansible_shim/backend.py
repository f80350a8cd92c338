"""Where the contexts of a connection live: the backend.

A backend hands out :class:`mitogen_native.core.Context` objects for a
*connection stack*, a list of hop dicts, outermost first::

    [{'method': 'ssh', 'hostname': 'web1', 'port': 22, 'username': 'deploy', ...},
     {'method': 'sudo', 'username': 'root', 'password': '...'}]

Each hop's keys other than ``method`` are exactly the keyword arguments of
``mitogen_native.master.Router.<method>`` (``via`` excepted: the previous hop is
the via). Three methods, the whole interface:

* ``connect(stack)`` -> Context (blocking; raises the API's exceptions:
  ``StreamError``, ``PasswordError``, ...);
* ``reset(stack)``: forget (and shut down) the context of that stack and every
  context below it, so the next ``connect`` makes a fresh one;
* ``detach()``: this process is done with the backend for now.

Two implementations: the multiplexer daemon's client (``mitogen_native.mux``,
shared contexts that outlive one ansible-playbook run) and
:class:`LocalBackend` (a Broker and Router inside this process).
:func:`get_backend` is the one place that chooses.
"""
import os
import threading

#: Environment variable that picks the backend: ``auto`` (default: the daemon
#: when it is installed, else in-process), ``local`` (always in-process) or
#: ``mux`` (the daemon or an error).
BACKEND_ENV = 'MITOGEN_NATIVE_BACKEND'

#: Non-empty (and not 0): the in-process backend writes debug logs
#: (docs/ansible.md, "Troubleshooting").
DEBUG_ENV = 'MITOGEN_NATIVE_DEBUG'

_lock = threading.Lock()
_backend = None
_backend_pid = None
# Backends inherited from a parent process over fork(). Their broker thread
# does not exist here: dropping the last reference would run a destructor that
# waits for it. They are kept, unused, until this process ends.
_inherited = []


class BackendError(Exception):
    """The backend asked for cannot be used (message says why)."""


def stack_key(stack):
    """A hashable, order-preserving identity of a stack (or of its first hops)."""
    def freeze(v):
        if isinstance(v, (list, tuple)):
            return tuple(freeze(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((str(k), freeze(x)) for k, x in v.items()))
        return v
    return tuple(freeze(hop) for hop in stack)


class LocalBackend(object):
    """Contexts owned by this process: one Broker and Router, created on first
    use, and a cache of contexts by stack. Nothing outlives the process: an
    Ansible worker that ends takes its connections along (the remote agents
    exit when their connection closes)."""

    def __init__(self):
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._broker = None
        self._router = None
        self._contexts = {}     # stack_key(stack[:i]) -> Context

    def _get_router(self):
        if self._router is None:
            import mitogen_native.master
            self._broker = mitogen_native.master.Broker()
            self._router = mitogen_native.master.Router(self._broker)
            if os.environ.get(DEBUG_ENV, '').strip() not in ('', '0'):
                # /tmp/mitogen.<pid>.log here and in every context started.
                self._router.enable_debug()
        return self._router

    def connect(self, stack):
        if not stack:
            raise ValueError('connect(): empty stack')
        with self._lock:
            router = self._get_router()
            via = None
            for i, hop in enumerate(stack):
                key = stack_key(stack[:i + 1])
                ctx = self._contexts.get(key)
                if ctx is None:
                    kwargs = dict(hop)
                    method = kwargs.pop('method')
                    if method not in ('local', 'ssh', 'sudo', 'su', 'doas'):
                        raise ValueError('unknown connection method %r' % (method,))
                    if via is not None:
                        kwargs['via'] = via
                    ctx = getattr(router, method)(**kwargs)
                    self._contexts[key] = ctx
                via = ctx
            return via

    def reset(self, stack):
        prefix = stack_key(stack)
        with self._lock:
            doomed = [k for k in self._contexts if k[:len(prefix)] == prefix]
            # Deepest first: a context started via another goes before it.
            doomed.sort(key=len, reverse=True)
            contexts = [self._contexts.pop(k) for k in doomed]
        for ctx in contexts:
            try:
                ctx.shutdown()
            except Exception:
                pass

    def detach(self):
        """Ask every context of this process to exit (without waiting): a
        worker calls this when its task ends, just before it exits."""
        with self._lock:
            contexts = sorted(self._contexts.items(), key=lambda kv: len(kv[0]),
                              reverse=True)
            self._contexts.clear()
        for _, ctx in contexts:
            try:
                ctx.shutdown()
            except Exception:
                pass


def _daemon_backend(required):
    """The daemon's client, or None when it is not installed (an error when
    `required`)."""
    try:
        from mitogen_native import mux
    except ImportError as e:
        if required:
            raise BackendError('%s=mux, but mitogen_native.mux cannot be imported: %s'
                               % (BACKEND_ENV, e))
        return None
    try:
        return mux.backend()
    except Exception as e:
        if required:
            raise BackendError('the mitogen-native daemon is not available: %s' % (e,))
        return None


def get_backend():
    """The backend this process uses (made on first call; a process forked
    from one that had a backend makes its own)."""
    global _backend, _backend_pid
    with _lock:
        pid = os.getpid()
        if _backend is not None and _backend_pid == pid:
            return _backend
        if _backend is not None:
            _inherited.append(_backend)
            _backend = None
        choice = os.environ.get(BACKEND_ENV, 'auto').strip().lower() or 'auto'
        if choice not in ('auto', 'local', 'mux'):
            raise BackendError('%s=%r: expected auto, local or mux' % (BACKEND_ENV, choice))
        backend = None
        if choice != 'local':
            backend = _daemon_backend(required=(choice == 'mux'))
        if backend is None:
            backend = LocalBackend()
        _backend, _backend_pid = backend, pid
        return backend

