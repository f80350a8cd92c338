"""The controlling program's side: :class:`Broker` and :class:`Router`."""
import logging
import os
import sys
import sysconfig

from mitogen_native import _native
from mitogen_native import core


def _module_search_path():
    """What contexts may import from this program: sys.path without the standard
    library (each context has its own), and the main script (served as
    ``__main__`` up to its ``if __name__ == '__main__':`` guard)."""
    stdlib = set(os.path.realpath(sysconfig.get_paths()[k])
                 for k in ('stdlib', 'platstdlib'))

    def served(p):
        r = os.path.realpath(p or '.')
        return os.path.isdir(r) and not any(
            r == s or r.startswith(s + os.sep) for s in stdlib)

    search_path = [os.path.abspath(p or '.') for p in sys.path if served(p)]
    main_file = getattr(sys.modules.get('__main__'), '__file__', None)
    return search_path, main_file and os.path.abspath(main_file)


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
        self._serve_modules(*_module_search_path(), [], [])

    def local(self, remote_name=None, python_path=None, debug=None,
              connect_timeout=None, name=None, via=None, **kwargs):
        """Start a Python interpreter as a subprocess under this router's control
        and return its :class:`mitogen_native.core.Context` once it has booted.

        :param remote_name: the child's ``argv[0]`` becomes ``mitogen:<remote_name>``
            (default ``<user>@<host>:<our pid>``); also the context's name.
        :param python_path: interpreter command (str or list); default
            ``sys.executable``.
        :param debug: the child writes a DEBUG log to ``/tmp/mitogen.<child pid>.log``
            (default: :attr:`debug`, set by :meth:`enable_debug`).
        :param connect_timeout: seconds allowed for the bootstrap (default 30).
        :param name: the returned Context's name, if it should differ from
            ``remote_name``.
        :raises mitogen_native.core.StreamError: the child could not be started.
        """
        if via is not None:
            raise NotImplementedError(
                'via= (contexts started through other contexts) arrives with the '
                'SSH/sudo connection methods; it is not available yet')
        if kwargs:
            raise TypeError('local() got unexpected keyword argument(s): %s'
                            % ', '.join(sorted(kwargs)))
        if python_path is None:
            python_path = [sys.executable or '/usr/bin/python3']
        elif isinstance(python_path, str):
            python_path = [python_path]
        else:
            python_path = [str(p) for p in python_path]
        if debug is None:
            debug = self.debug
        if connect_timeout is None:
            connect_timeout = 30.0
        # Children forward records at INFO and above, or DEBUG when this program
        # (or enable_debug()) asks for them.
        log_level = logging.DEBUG if (
            debug or logging.getLogger('mitogen.ctx').isEnabledFor(logging.DEBUG)) else logging.INFO
        return self._local(remote_name, python_path, bool(debug), float(connect_timeout),
                           name, log_level)

    def ssh(self, hostname, port=None, username=None, password=None,
            identity_file=None, check_host_keys='enforce', known_hosts_file=None,
            connect_timeout=None, keepalive_interval=None, python_path=None,
            remote_name=None, transport='libssh2', ssh_path=None, ssh_args=None,
            ssh_config_file=None, debug=None, name=None, via=None):
        """Start a context on another host over SSH and return it once its agent
        has booted. The SSH client runs inside this process (libssh2) unless
        ``transport='openssh'``; see docs/ssh.md for every option.

        :param identity_file: a key file or a list of them (default: ~/.ssh/config's
            IdentityFile, else ~/.ssh/id_ed25519, id_ecdsa, id_rsa).
        :param check_host_keys: ``'enforce'`` (default), ``'accept'`` (record unknown
            keys) or ``'ignore'``.
        :param python_path: remote interpreter (str or list); default: the first of
            python3, /usr/bin/python3, python found there.
        :raises mitogen_native.core.StreamError: authentication failed, the host key
            was refused (the message shows its fingerprint), the host is unreachable,
            or the agent did not start within ``connect_timeout`` seconds.
        """
        if via is not None:
            raise NotImplementedError(
                'via= (contexts started through other contexts) is not available yet')
        if isinstance(identity_file, str):
            identity_file = [identity_file]
        if isinstance(python_path, str):
            python_path = [python_path]
        if debug is None:
            debug = self.debug
        log_level = logging.DEBUG if (
            debug or logging.getLogger('mitogen.ctx').isEnabledFor(logging.DEBUG)) else logging.INFO
        return self._ssh(dict(
            hostname=hostname, port=port, username=username, password=password,
            identity_files=identity_file, check_host_keys=check_host_keys,
            known_hosts_file=known_hosts_file, connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval, python_path=python_path,
            remote_name=remote_name, transport=transport, ssh_path=ssh_path,
            ssh_args=ssh_args, ssh_config_file=ssh_config_file, debug=bool(debug),
            log_level=log_level, name=name))

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
        handlers = self.__dict__.get('_handlers')
        if handlers is None:
            handlers = self.__dict__.setdefault('_handlers', core._Handlers(self))
        return handlers.add(fn, handle, persist, policy, respondent, overwrite)

    def del_handler(self, handle):
        """Remove the handler of `handle` (added by add_handler or a Receiver).

        :raises KeyError: no handler added by add_handler() has that handle."""
        handlers = self.__dict__.get('_handlers')
        if handlers is None or not handlers.remove(handle):
            raise KeyError(handle)

    def enable_debug(self):
        """Turn on debug logs: this program's go to ``/tmp/mitogen.<pid>.log``, and
        every context started afterwards writes its own to
        ``/tmp/mitogen.<child pid>.log``."""
        core.enable_debug_logging()
        self.debug = True

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.broker.shutdown()
        self.broker.join()


Broker.__module__ = Router.__module__ = __name__
