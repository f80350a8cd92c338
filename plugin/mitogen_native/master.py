"""The controlling program's side: :class:`Broker` and :class:`Router`."""
import atexit
import importlib.machinery
import logging
import os
import sys
import sysconfig
import zipimport

from mitogen_native import _native
from mitogen_native import _channels
from mitogen_native import _options as _o
from mitogen_native import _wire
from mitogen_native import core


# -- Modules for the contexts (docs/protocol.md, "Modules") -----------------
#
# A context that cannot import a module asks this program (GET_MODULE). The core's
# module responder queues the request off the broker thread and calls
# _resolve_module() on its worker thread (with the GIL) when it has no answer
# built from the same content already: what is served is what this program could
# import at that moment, including modules added to sys.path or provided by
# sys.meta_path hooks after the Router was made.

_STDLIB_DIRS = tuple(sorted(set(
    os.path.realpath(sysconfig.get_paths()[k]) for k in ('stdlib', 'platstdlib'))))
_STDLIB_NAMES = frozenset(getattr(sys, 'stdlib_module_names', ())) | frozenset(
    sys.builtin_module_names)


def _is_stdlib(origin):
    """True if `origin` lies in the standard library's directories (but not in a
    site-packages or dist-packages directory inside them)."""
    real = os.path.realpath(origin)
    return any((real == d or real.startswith(d + os.sep)) and
               'site-packages' not in real and 'dist-packages' not in real
               for d in _STDLIB_DIRS)


def _find_spec(fullname):
    """The spec importing `fullname` would use, found as importlib does
    (sys.meta_path, then sys.path through its finders and path hooks) but
    without importing anything: a parent package not yet imported is searched
    for, never executed. None if the program could not import it."""
    parent = fullname.rpartition('.')[0]
    path = None
    if parent:
        if parent in sys.modules:
            path = getattr(sys.modules[parent], '__path__', None)
        else:
            spec = _find_spec(parent)
            path = spec.submodule_search_locations if spec is not None else None
        if path is None:
            return None   # the parent is not an importable package
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, 'find_spec', None)
        if find_spec is not None:
            spec = find_spec(fullname, path, None)
            if spec is not None:
                return spec
    return None


def _submodules(fullname, locations):
    """A package's direct submodules: those its __path__ entries list, and those
    already imported (a meta-path hook's package may have no listable path)."""
    import pkgutil
    names = set()
    try:
        names.update(name for _, name, _ in pkgutil.iter_modules(list(locations)))
    except Exception:
        pass
    prefix = fullname + '.'
    for name in list(sys.modules):
        if name.startswith(prefix) and '.' not in name[len(prefix):]:
            names.add(name[len(prefix):])
    return sorted(names)


def _resolve_module(fullname):
    """What this program would import as `fullname`, right now:
    ``(path, source, is_package, submodules)``, or None if it could not import
    it or it belongs to the standard library (each context has its own).

    ``source`` is None for a plain ``.py`` file: the core reads ``path`` itself,
    and serves it again without calling this function while its content is
    unchanged. Modules in sys.modules come first, as for ``import``. Runs on the
    module responder's worker thread."""
    if fullname.partition('.')[0] in _STDLIB_NAMES:
        return None
    if fullname in sys.modules:
        module = sys.modules[fullname]
        if module is None:
            return None   # import blocked on purpose
        spec = getattr(module, '__spec__', None)
        locations = getattr(module, '__path__', None)
        if spec is None:
            origin = getattr(module, '__file__', None)
            if not (isinstance(origin, str) and origin.endswith('.py')):
                return None
            return (origin, None, locations is not None,
                    _submodules(fullname, locations) if locations is not None else [])
    else:
        spec = _find_spec(fullname)
        if spec is None:
            return None
        locations = spec.submodule_search_locations
    loader, origin = spec.loader, spec.origin
    is_pkg = locations is not None
    subs = _submodules(fullname, locations) if is_pkg else []
    if is_pkg and origin in (None, 'namespace') and (
            loader is None or type(loader).__name__ in ('NamespaceLoader', '_NamespaceLoader')):
        # A namespace package: no source of its own.
        locations = list(locations)
        if not locations or _is_stdlib(locations[0]):
            return None
        return (locations[0], b'', True, subs)
    if loader is None or isinstance(loader, (
            importlib.machinery.ExtensionFileLoader,
            importlib.machinery.SourcelessFileLoader)) or loader in (
            importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter):
        return None   # no source to send: compiled, built in or frozen
    if isinstance(origin, str) and _is_stdlib(origin):
        return None
    if isinstance(loader, importlib.machinery.SourceFileLoader):
        return (origin, None, is_pkg, subs)
    if isinstance(loader, zipimport.zipimporter):
        if not (isinstance(origin, str) and origin.endswith('.py')):
            return None   # bytecode only
        return (origin, loader.get_data(origin), is_pkg, subs)
    get_source = getattr(loader, 'get_source', None)
    source = get_source(fullname) if get_source is not None else None
    if source is None:
        return None
    if isinstance(source, str):
        source = source.encode('utf-8')
    return (origin if isinstance(origin, str) and origin else '<%s>' % (fullname,),
            source, is_pkg, subs)


def _main_script():
    """The main script, served as ``__main__`` up to its
    ``if __name__ == '__main__':`` guard."""
    main_file = getattr(sys.modules.get('__main__'), '__file__', None)
    return main_file and os.path.abspath(main_file)


# Before the interpreter finalizes, the responders' worker threads must stop
# taking the GIL (they would be killed inside C++ frames).
atexit.register(_native._stop_module_resolvers)


class Broker(_native.Broker):
    """Runs the private I/O thread (a C++ thread) serving its routers.

    Call :meth:`shutdown` then :meth:`join` when done; a program that forgets is
    cleaned up at interpreter exit anyway. Usable as a context manager.
    """
    def __init__(self):
        _native.Broker.__init__(self)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.shutdown()
        self.join()


class Router(_native.Router):
    """Creates contexts and routes their messages. Any number of routers may share
    one broker; ``Router()`` without a broker makes its own."""

    def __init__(self, broker=None):
        if broker is None:
            broker = Broker()
        _native.Router.__init__(self, broker)
        core._log_pump.start()
        _native._serve_modules_live(self, _resolve_module, _main_script(), [], [],
                                    sorted(_STDLIB_NAMES))

    _SHUT_DOWN = 'mitogen: the router has been shut down'

    def _check_running(self):
        """Refuse, before anything is started or checked, once this router or
        its broker was shut down: every method gives the same answer."""
        if self.__dict__.get('_shut_down') or self.broker.shutting_down:
            raise _wire._stream_error('broker_shut_down', self._SHUT_DOWN)

    def shutdown(self):
        """Ask this router's contexts to exit, then (once they have, or after half
        a second) close their streams and release its waiting callers. The broker
        keeps running for other routers. Does not block. Afterwards every method
        that would start something raises StreamError."""
        self.__dict__['_shut_down'] = True
        _native.Router.shutdown(self)

    def _log_level(self, log_level, debug):
        """The level of records a child forwards: `log_level` if given (a number
        or a name such as ``'DEBUG'``), else DEBUG when `debug` or this program's
        ``mitogen.ctx`` logger wants DEBUG, else INFO."""
        if isinstance(log_level, str) and not log_level.strip().isdigit():
            level = logging.getLevelName(log_level.strip().upper())
            if not isinstance(level, int):
                raise ValueError('log_level: unknown level name %r' % (log_level,))
            return level
        level = _o.as_int('log_level', log_level, 0, 100)
        if level is not None:
            return level
        return logging.DEBUG if (
            debug or logging.getLogger('mitogen.ctx').isEnabledFor(logging.DEBUG)) else logging.INFO

    def local(self, remote_name=None, python_path=None, debug=None,
              connect_timeout=None, name=None, via=None, log_level=None,
              max_message_size=None, **kwargs):
        """Start a Python interpreter as a subprocess under this router's control
        and return its :class:`mitogen_native.core.Context` once it has booted.

        Numbers may be given as numeric strings, as upstream accepts; any option of
        the wrong type raises ``TypeError`` naming it, before anything starts.

        :param remote_name: the child's ``argv[0]`` becomes ``mitogen:<remote_name>``
            (default ``<user>@<host>:<our pid>``); if given, also the context's
            name (default ``local.<child pid>``).
        :param python_path: interpreter command (str or list); default
            ``sys.executable`` (with ``via``: that context's own interpreter).
        :param debug: the child writes a DEBUG log to ``$TMPDIR/mitogen-<uid>/mitogen.<child pid>.log``
            (default: :attr:`debug`, set by :meth:`enable_debug`).
        :param connect_timeout: seconds allowed for the bootstrap (default 30).
        :param name: the returned Context's name, if it should differ.
        :param via: a Context that starts the child instead of this program: a
            subprocess of that context, which routes its messages and serves it
            modules (docs/via.md).
        :param log_level: level of the log records the child forwards (a number or
            a name such as ``'DEBUG'``); default INFO, or DEBUG with ``debug`` or
            when this program's ``mitogen.ctx`` logger is at DEBUG.
        :param max_message_size: largest message, in bytes, either side accepts
            from the other (default 128 MiB, as upstream).
        :raises mitogen_native.core.StreamError: the child could not be started
            (the message carries its stderr and exit status), or this router
            was shut down.
        """
        self._check_running()
        if kwargs:
            raise TypeError('local() got unexpected keyword argument(s): %s'
                            % ', '.join(sorted(kwargs)))
        remote_name = _o.as_str('remote_name', remote_name)
        python_path = _o.as_str_list('python_path', python_path)
        debug = _o.as_bool('debug', debug)
        connect_timeout = _o.as_float('connect_timeout', connect_timeout, positive=True)
        name = _o.as_str('name', name)
        max_message_size = _o.as_int('max_message_size', max_message_size, 1, 2**32 - 1)
        if python_path is None:
            python_path = [] if via is not None else [sys.executable or '/usr/bin/python3']
        if debug is None:
            debug = self.debug
        if connect_timeout is None:
            connect_timeout = 30.0
        log_level = self._log_level(log_level, debug)
        return self._started(self._connect('local', dict(
            remote_name=remote_name, python_path=python_path, debug=bool(debug),
            connect_timeout=float(connect_timeout), name=name, log_level=log_level,
            via=via, max_message_size=max_message_size)), via)

    def ssh(self, hostname, port=None, username=None, password=None,
            identity_file=None, check_host_keys='enforce', known_hosts_file=None,
            connect_timeout=None, keepalive_interval=None, python_path=None,
            remote_name=None, transport='libssh2', ssh_path=None, ssh_args=None,
            ssh_config_file=None, debug=None, name=None, via=None,
            identity_files=None, use_agent=None, keepalive_count=None,
            compression=None, identities_only=None, ssh_debug_level=None,
            log_level=None, max_message_size=None):
        """Start a context on another host over SSH and return it once its agent
        has booted. The SSH client runs inside this process (libssh2) unless
        ``transport='openssh'``; docs/ssh.md describes every option.

        Numbers may be given as numeric strings, as upstream accepts; any option of
        the wrong type raises ``TypeError`` naming it, before anything starts.

        :param hostname: name, address or ``~/.ssh/config`` Host alias (required).
        :param port: default: the config's Port, else 22.
        :param username: default: the config's User, else the local user.
        :param password: for password and keyboard-interactive authentication
            (libssh2 only; the openssh transport refuses it).
        :param identity_file: upstream's name: a key file (or a list of them).
        :param identity_files: private keys tried in order (default: the config's
            IdentityFile, else ~/.ssh/id_ed25519, id_ecdsa, id_rsa that exist).
            ``identity_file`` and ``identity_files`` are tried together.
        :param use_agent: offer the keys of the agent at ``SSH_AUTH_SOCK`` first
            (default True).
        :param identities_only: upstream's name: with True and keys or a password
            given, the agent is not asked (``use_agent=False``; openssh:
            ``IdentitiesOnly=yes``).
        :param check_host_keys: ``'enforce'`` (default), ``'accept'`` (record unknown
            keys) or ``'ignore'``.
        :param known_hosts_file: default ``~/.ssh/known_hosts``.
        :param connect_timeout: seconds for everything up to the first call
            (default 30).
        :param keepalive_interval: seconds between keepalives (default 15; 0: none).
        :param keepalive_count: unanswered keepalives before the connection is
            declared dead (default 3).
        :param compression: zlib compression of the SSH stream (default False).
        :param ssh_config_file: client config to read (default ``~/.ssh/config``;
            ``''``: none).
        :param transport: ``'libssh2'`` (default) or ``'openssh'`` (the ``ssh``
            binary).
        :param ssh_path: openssh transport: the binary (default ``ssh``).
        :param ssh_args: openssh transport: extra arguments before the host name
            (a list, or a string split on whitespace).
        :param ssh_debug_level: upstream's name: openssh transport: ``-v`` that many
            times (its output is logged as the context's stderr); the libssh2
            transport has no debug output and ignores it.
        :param python_path: remote interpreter (str or list); default: the first of
            python3, /usr/bin/python3, python found there.
        :param remote_name: the remote ``argv`` shows ``mitogen:<remote_name>``
            (default ``<user>@<host>:<our pid>``).
        :param debug: the remote agent writes a DEBUG log (default: :attr:`debug`).
        :param log_level: as :meth:`local`.
        :param max_message_size: as :meth:`local`.
        :param name: the returned Context's name (default ``ssh.<host>[:<port>]``).
        :param via: a Context that runs the connection instead of this program,
            with its system ``ssh`` client (``transport`` is then ignored and
            ``password`` refused; docs/via.md).
        :raises mitogen_native.core.StreamError: authentication failed, the host key
            was refused (the message shows its fingerprint), the host is unreachable,
            or the agent did not start within ``connect_timeout`` seconds.
        """
        self._check_running()
        hostname = _o.as_str('hostname', hostname)
        if not hostname:
            raise ValueError('hostname must not be empty')
        port = _o.as_int('port', port, 1, 65535)
        username = _o.as_str('username', username)
        password = _o.as_str('password', password)
        keys = _o.as_str_list('identity_file', identity_file)
        more = _o.as_str_list('identity_files', identity_files)
        if more is not None:
            keys = (keys or []) + more
        use_agent = _o.as_bool('use_agent', use_agent)
        identities_only = _o.as_bool('identities_only', identities_only)
        if identities_only and use_agent is None and (keys or password is not None):
            use_agent = False
        check_host_keys = _o.as_choice('check_host_keys', check_host_keys,
                                       ('enforce', 'accept', 'ignore'))
        known_hosts_file = _o.as_str('known_hosts_file', known_hosts_file)
        connect_timeout = _o.as_float('connect_timeout', connect_timeout, positive=True)
        keepalive_interval = _o.as_float('keepalive_interval', keepalive_interval)
        keepalive_count = _o.as_int('keepalive_count', keepalive_count, 0, 1000000)
        compression = _o.as_bool('compression', compression)
        python_path = _o.as_str_list('python_path', python_path)
        remote_name = _o.as_str('remote_name', remote_name)
        transport = _o.as_choice('transport', transport, ('libssh2', 'openssh'))
        ssh_path = _o.as_str('ssh_path', ssh_path)
        ssh_args = _o.as_str_list('ssh_args', ssh_args, split=True, ints=True)
        ssh_debug_level = _o.as_int('ssh_debug_level', ssh_debug_level, 0, 3)
        if ssh_debug_level:
            ssh_args = ['-' + 'v' * ssh_debug_level] + (ssh_args or [])
        ssh_config_file = _o.as_str('ssh_config_file', ssh_config_file)
        debug = _o.as_bool('debug', debug)
        name = _o.as_str('name', name)
        max_message_size = _o.as_int('max_message_size', max_message_size, 1, 2**32 - 1)
        if debug is None:
            debug = self.debug
        log_level = self._log_level(log_level, debug)
        return self._started(self._connect('ssh', dict(
            hostname=hostname, port=port, username=username, password=password,
            identity_files=keys, use_agent=use_agent, check_host_keys=check_host_keys,
            known_hosts_file=known_hosts_file, connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval, keepalive_count=keepalive_count,
            compression=compression, python_path=python_path,
            remote_name=remote_name, transport=transport, ssh_path=ssh_path,
            ssh_args=ssh_args, ssh_config_file=ssh_config_file, debug=bool(debug),
            log_level=log_level, max_message_size=max_message_size, name=name,
            via=via)), via)

    # -- sudo / su / doas (docs/become.md) ------------------------------------

    def _become_start(self, method, via, options):
        self._check_running()
        o = dict(options)
        o['via'] = via
        for k in ('username', 'password', 'sudo_path', 'su_path', 'doas_path',
                  'selinux_role', 'selinux_type', 'remote_name', 'name'):
            if k in o:
                o[k] = _o.as_str(k, o[k])
        for k in ('preserve_env', 'set_home', 'login', 'debug'):
            if k in o:
                o[k] = _o.as_bool(k, o[k])
        o['connect_timeout'] = _o.as_float('connect_timeout', o.get('connect_timeout'),
                                           positive=True)
        python_path = _o.as_str_list('python_path', o.get('python_path'))
        # Through via=, the intermediary's own interpreter (docs/via.md).
        o['python_path'] = python_path if python_path is not None else (
            [] if via is not None else [sys.executable or '/usr/bin/python3'])
        # One prompt (upstream su/doas: password_prompt=) or a list of them.
        prompts = list(_o.as_str_list('password_prompt', o.pop('password_prompt', None)) or [])
        prompts += _o.as_str_list('password_prompts', o.get('password_prompts')) or []
        o['password_prompts'] = prompts or None
        for k in ('incorrect_prompts', 'not_allowed_prompts'):
            o[k] = _o.as_str_list(k, o.get(k))
        o['sudo_args'] = _o.as_str_list('sudo_args', o.get('sudo_args'), split=True)
        if o.get('debug') is None:
            o['debug'] = self.debug
        o['debug'] = bool(o['debug'])
        o['log_level'] = self._log_level(o.get('log_level'), o['debug'])
        o['max_message_size'] = _o.as_int('max_message_size', o.get('max_message_size'),
                                          1, 2**32 - 1)
        return self._started(self._connect(method, o), via)

    def sudo(self, username=None, sudo_path=None, password=None, sudo_args=None,
             preserve_env=None, set_home=None, login=None, selinux_role=None,
             selinux_type=None, password_prompts=None, incorrect_prompts=None,
             not_allowed_prompts=None, python_path=None, remote_name=None,
             connect_timeout=None, debug=None, name=None, via=None,
             log_level=None, max_message_size=None):
        """Start a context as another user through sudo and return it once its agent
        has booted. sudo runs with a terminal of its own, so a password prompt is
        answered (once) with ``password``; see docs/become.md. Numbers may be given
        as numeric strings; an option of the wrong type raises ``TypeError``.

        :param username: target user (default ``root``, or ``-u`` of ``sudo_args``).
        :param sudo_path: the sudo program (default ``sudo`` from PATH).
        :param password: answers sudo's password prompt (str or bytes).
        :param sudo_args: extra flags as a list or a string, parsed like upstream:
            ``-E -H -i -u USER -r ROLE -t TYPE`` (long forms too); ``-S`` and ``-n``
            are accepted and ignored.
        :param preserve_env: keep the environment (``-E``).
        :param set_home: set ``HOME`` to the target user's (``-H``).
        :param login: run a login shell (``-i``).
        :param selinux_role, selinux_type: SELinux role and type (``-r``, ``-t``).
        :param password_prompts: texts that make a partial line a password prompt
            (case-insensitive substrings; default: "password" in ~30 languages).
        :param incorrect_prompts: texts meaning the password was refused.
        :param not_allowed_prompts: texts meaning the user may not run it.
        :param python_path: interpreter (str or list); default ``sys.executable``.
        :param remote_name: the new process shows as ``mitogen:<remote_name>``.
        :param connect_timeout: seconds for everything, prompt included (default 30).
        :param debug, log_level, max_message_size: as :meth:`local`.
        :param name: the returned Context's name (default ``sudo.<username>``).
        :param via: a Context that runs sudo instead of this program (docs/via.md).
        :raises mitogen_native.core.PasswordError: the password was refused, or one
            was asked for and none given (a StreamError).
        :raises mitogen_native.core.StreamError: no sudoers rule allows it, the
            timeout passed, or the interpreter did not start.
        """
        return self._become_start('sudo', via, dict(
            username=username, sudo_path=sudo_path, password=password,
            sudo_args=sudo_args, preserve_env=preserve_env, set_home=set_home,
            login=login, selinux_role=selinux_role, selinux_type=selinux_type,
            password_prompts=password_prompts, incorrect_prompts=incorrect_prompts,
            not_allowed_prompts=not_allowed_prompts, python_path=python_path,
            remote_name=remote_name, connect_timeout=connect_timeout, debug=debug,
            name=name, log_level=log_level, max_message_size=max_message_size))

    def su(self, username=None, password=None, su_path=None, password_prompt=None,
           incorrect_prompts=None, password_prompts=None, not_allowed_prompts=None,
           python_path=None, remote_name=None, connect_timeout=None, debug=None,
           name=None, via=None, log_level=None, max_message_size=None):
        """Start a context as another user through ``su USER -c ...``; as
        :meth:`sudo` (upstream's ``password_prompt`` is one more prompt text)."""
        return self._become_start('su', via, dict(
            username=username, password=password, su_path=su_path,
            password_prompt=password_prompt, password_prompts=password_prompts,
            incorrect_prompts=incorrect_prompts,
            not_allowed_prompts=not_allowed_prompts, python_path=python_path,
            remote_name=remote_name, connect_timeout=connect_timeout, debug=debug,
            name=name, log_level=log_level, max_message_size=max_message_size))

    def doas(self, username=None, password=None, doas_path=None,
             password_prompt=None, incorrect_prompts=None, password_prompts=None,
             not_allowed_prompts=None, python_path=None, remote_name=None,
             connect_timeout=None, debug=None, name=None, via=None,
             log_level=None, max_message_size=None):
        """Start a context as another user through ``doas -u USER``; as
        :meth:`sudo`."""
        return self._become_start('doas', via, dict(
            username=username, password=password, doas_path=doas_path,
            password_prompt=password_prompt, password_prompts=password_prompts,
            incorrect_prompts=incorrect_prompts,
            not_allowed_prompts=not_allowed_prompts, python_path=python_path,
            remote_name=remote_name, connect_timeout=connect_timeout, debug=debug,
            name=name, log_level=log_level, max_message_size=max_message_size))

    def disconnect(self, context):
        """Close the connection to `context` at once, as upstream's
        Router.disconnect(): its calls in progress fail with ChannelError and the
        child, seeing its input end, exits (with every context reached through
        it). Unlike :meth:`Context.shutdown`, nothing waits for the current call.
        As upstream, only a context this program connected to directly is
        disconnected; for any other one it does nothing (call its
        ``shutdown()``)."""
        if not isinstance(context, core.Context):
            raise TypeError('disconnect() takes a Context, not %s' % type(context).__name__)
        self._disconnect(context.context_id)

    def disconnect_all(self):
        """:meth:`disconnect` every context this program is directly connected
        to; the router stays usable (unlike :meth:`shutdown`)."""
        for context_id in list(self._direct_ids()):
            self._disconnect(context_id)

    def _direct_ids(self):
        return self.__dict__.get('_direct', ())

    def _started(self, context, via):
        if via is None:
            self.__dict__.setdefault('_direct', set()).add(context.context_id)
        return context

    def myself(self):
        """A Context for this program (context id 0), e.g. for Senders."""
        return self.context_by_id(self.context_id, 'master')

    def add_handler(self, fn, handle=None, persist=True, policy=None,
                    respondent=None, overwrite=False):
        """Call ``fn(msg)`` for each :class:`mitogen_native.core.Message` sent
        to `handle` (a fresh one if None; returned). fn runs on this router's
        handler thread (one daemon thread, never the broker's): it may block,
        but delays this router's other handlers meanwhile. A dead message is
        passed too (``msg.is_dead``) when the channel ends, after which the
        handler is gone. Who may send: as for :class:`Receiver`
        (docs/channels.md)."""
        self._check_running()
        handlers = self.__dict__.get('_handlers')
        if handlers is None:
            handlers = self.__dict__.setdefault('_handlers', _channels._Handlers(self))
        return handlers.add(fn, handle, persist, policy, respondent, overwrite)

    def del_handler(self, handle):
        """Remove the handler of `handle` (added by add_handler or a Receiver).

        :raises KeyError: no handler added by add_handler() has that handle."""
        handlers = self.__dict__.get('_handlers')
        if handlers is None or not handlers.remove(handle):
            raise KeyError(handle)

    def enable_debug(self):
        """Turn on debug logs: this program's go to ``$TMPDIR/mitogen-<uid>/mitogen.<pid>.log``, and
        every context started afterwards writes its own to
        ``$TMPDIR/mitogen-<uid>/mitogen.<child pid>.log``."""
        core.enable_debug_logging()
        self.debug = True

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.broker.shutdown()
        self.broker.join()


Broker.__module__ = Router.__module__ = __name__
