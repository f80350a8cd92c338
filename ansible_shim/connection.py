"""The connection plugins ``mitogen.native.ssh`` and ``mitogen.native.local``.

The collection's plugin files (plugin/collection/plugins/connection/) hold the
option documentation Ansible reads and import these classes. Everything here
runs in Ansible's processes: in a worker for each task, and in the top-level
process for ``meta: reset_connection``.

A task reaches the target like this::

    worker: Connection.exec_command(cmd, in_data)
      -> backend.connect(stack)                (cached context of this stack)
      -> ctx.call(mitogen_native_target.exec_command, cmd, in_data, ...)
                                               (one exchange with the agent)

Commands that Ansible wrapped with the become plugin run, unwrapped, in a
context started through sudo/su/doas (a hop appended to the stack), so a
pipelined module still runs in a warm agent, as the become user.
"""
import errno
import getpass
import logging
import os
import shlex
import shutil
import stat

from ansible import constants as C
from ansible.errors import (AnsibleConnectionFailure, AnsibleError,
                            AnsibleFileNotFound)
from ansible.module_utils._text import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

import mitogen_native.core
import mitogen_native_target

from mitogen_native.ansible import backend as _backend
from mitogen_native.ansible import compat
from mitogen_native.ansible import ssh_options

display = Display()

# This process (an Ansible worker) builds its task's module payloads: keep
# what Ansible's module_common finds in each module_utils file across builds.
try:
    compat.cache_module_deps()
except Exception as _e:     # never worth failing a task for
    display.vvv('mitogen-native: no module dependency cache: %s' % (_e,))

_AUTO_INTERPRETERS = ('auto', 'auto_silent', 'auto_legacy', 'auto_legacy_silent')
#: become methods run as a context (Router.sudo / su / doas).
_BECOME_METHODS = ('sudo', 'su', 'doas')


def _plain(v):
    """Templated values are AnsibleUnsafe* subclasses of str: hand the API
    plain built-in values only."""
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, bytes):
        return bytes(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return dict((str(k), _plain(x)) for k, x in v.items())
    return v


def _python_path(interpreter):
    """ansible_python_interpreter -> the agent's python_path (None: let the
    connection discover one, as 'auto' asks Ansible to)."""
    if not interpreter:
        return None
    text = str(interpreter).strip()
    if not text or text in _AUTO_INTERPRETERS:
        return None
    return shlex.split(text)


class _LogBridge(logging.Handler):
    """mitogen_native's log records (the core's and the contexts') to Ansible's
    display: warnings as warnings, the rest at -vvvv."""
    def emit(self, record):
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                display.warning('mitogen-native: %s' % (text,))
            else:
                display.vvvv('mitogen-native: %s: %s' % (record.name, text))
        except Exception:
            pass


_bridge_pid = None


def _install_log_bridge():
    global _bridge_pid
    if _bridge_pid == os.getpid():
        return
    _bridge_pid = os.getpid()
    logger = logging.getLogger('mitogen')
    for h in list(logger.handlers):
        if isinstance(h, _LogBridge):
            logger.removeHandler(h)
    logger.addHandler(_LogBridge())
    logger.propagate = False
    if display.verbosity < 4 and logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def _warm_modules():
    """False if MITOGEN_NATIVE_WARM_MODULES=0: forked module runs then import
    everything themselves instead of using a warm fork parent (for
    troubleshooting and for measuring what warm parents save)."""
    return os.environ.get('MITOGEN_NATIVE_WARM_MODULES', '1').strip() != '0'


class ConnectionMixin(object):
    """What both plugins share: contexts from the backend, command execution,
    become as a context, failure mapping."""

    has_pipelining = True
    # AnsiblePlugin derives the type from the class name; ours are not named
    # "Connection" (the collection's files import them under that name).
    plugin_type = 'connection'
    _fork_option = 'fork_modules'

    def __init__(self, play_context, new_stdin, *args, **kwargs):
        super(ConnectionMixin, self).__init__(play_context, new_stdin, *args, **kwargs)
        self._run_id = kwargs.get('ansible_playbook_pid') or str(os.getppid())
        self._var_options = None
        self._login_stack = None
        self._login = None
        self._become_contexts = {}     # stack_key -> Context
        self._become_unwrap = {}       # wrapped command -> (inner command, executable)

    # -- Ansible's hooks ------------------------------------------------------

    def set_options(self, task_keys=None, var_options=None, direct=None):
        super(ConnectionMixin, self).set_options(task_keys=task_keys, var_options=var_options,
                                                 direct=direct)
        # Kept for reset() in the top-level process, which passes raw vars.
        self._var_options = var_options

    def set_become_plugin(self, plugin):
        super(ConnectionMixin, self).set_become_plugin(plugin)
        if plugin is not None:
            compat.remember_become_commands(plugin, self._become_unwrap)

    def _connect(self):
        if not self._connected:
            _install_log_bridge()
            self._login_context()
            self._connected = True
        return self

    def close(self):
        """End of a task: the worker lets go of its contexts (the daemon keeps
        them; an in-process backend asks them to exit)."""
        if self._connected or self._login is not None:
            try:
                _backend.get_backend().detach()
            except Exception as e:
                display.vvv('mitogen-native: detach failed: %s' % (e,))
        self._login = None
        self._login_stack = None
        self._become_contexts.clear()
        self._connected = False

    def reset(self):
        """Forget this host's contexts (the next task starts new ones). Ansible
        2.14 calls it in the top-level process for meta: reset_connection, with
        options not yet templated: compat.templated_options() does it."""
        options = compat.templated_options(self, self._var_options)
        try:
            stack = self._build_login_stack(options)
        except AnsibleError as e:
            display.warning('mitogen-native: cannot reset the connection: %s' % (e,))
            return
        display.vvv('RESET %s' % (self._describe(stack),), host=self._host_for_display())
        try:
            _backend.get_backend().reset(stack)
        except Exception as e:
            display.warning('mitogen-native: reset failed: %s' % (e,))
        self._login = None
        self._login_stack = None
        self._become_contexts.clear()
        self._connected = False

    # -- stacks and contexts -------------------------------------------------

    def _current_options(self):
        return compat.current_options(self)

    def _warn_unsupported(self):
        pass

    def _fail_connect(self, e):
        name = getattr(self, 'ansible_name', None) or self._load_name
        raise AnsibleConnectionFailure('Failed to connect to the host via %s: %s' % (name, e))

    def _login_context(self):
        stack = self._build_login_stack(self._current_options())
        if self._login is None or stack != self._login_stack:
            display.vvv('ESTABLISH %s' % (self._describe(stack),),
                        host=self._host_for_display())
            self._warn_unsupported()
            try:
                self._login = _backend.get_backend().connect(stack)
            except _backend.BackendError as e:
                raise AnsibleError('mitogen-native: %s' % (e,))
            except mitogen_native.core.Error as e:
                self._fail_connect(e)
            self._login_stack = stack
            self._become_contexts.clear()
        return self._login

    def _describe(self, stack):
        parts = []
        for hop in stack:
            who = hop.get('username') or ''
            where = hop.get('hostname') or ''
            text = hop['method']
            if where:
                text += ' %s%s%s' % (who + '@' if who else '', where,
                                     ':%s' % hop['port'] if hop.get('port') else '')
            elif who:
                text += ' to %s' % who
            parts.append(text)
        return 'MITOGEN-NATIVE: ' + ' -> '.join(parts)

    def _host_for_display(self):
        return self._play_context.remote_addr

    def _become_hop(self):
        """The sudo/su/doas hop for the current become plugin, or None if its
        method cannot run as a context."""
        become = self.become
        name = compat.become_name(become)
        if name not in _BECOME_METHODS:
            return None

        def opt(key):
            try:
                return become.get_option(key, playcontext=self._play_context)
            except (KeyError, TypeError):
                try:
                    return become.get_option(key)
                except KeyError:
                    return None
        user = opt('become_user') or 'root'
        password = opt('become_pass') or None
        exe = opt('become_exe') or None
        flags = opt('become_flags') or ''
        timeout = self._become_timeout()
        hop = {'method': name, 'username': _plain(user), 'connect_timeout': timeout}
        if password:
            hop['password'] = _plain(password)
        if name == 'sudo':
            if exe and exe != 'sudo':
                hop['sudo_path'] = _plain(exe)
            if flags:
                hop['sudo_args'] = _plain(shlex.split(flags))
        else:
            if exe and exe != name:
                hop[name + '_path'] = _plain(exe)
            if flags.strip():
                compat.warn_once(
                    'mitogen-native: become_flags %r are ignored for %s (the %s context '
                    'takes no flags)' % (flags, name, name), self._run_id)
            if name == 'su':
                prompts = opt('prompt_l10n')
                if prompts:
                    hop['password_prompts'] = _plain(list(prompts))
        return hop

    def _become_timeout(self):
        try:
            t = self._current_options().get('timeout')
        except Exception:
            t = None
        return int(t) if t else 10

    def _become_context(self, hop):
        login = self._login_context()
        stack = list(self._login_stack) + [hop]
        key = _backend.stack_key(stack)
        ctx = self._become_contexts.get(key)
        if ctx is None:
            display.vvv('ESTABLISH %s' % (self._describe(stack),), host=self._host_for_display())
            # The become context inherits the login agent's environment: let
            # mitogen_native_target clean it first (its import does).
            self._call(login, mitogen_native_target.ready)
            try:
                ctx = _backend.get_backend().connect(stack)
            except mitogen_native.core.PasswordError as e:
                text = str(e).lower()
                if 'required' in text or 'none was given' in text:
                    raise AnsibleError('Missing %s password' % hop['method'])
                raise AnsibleError('Incorrect %s password' % hop['method'])
            except mitogen_native.core.Error as e:
                raise AnsibleError('mitogen-native: %s to %s failed: %s'
                                   % (hop['method'], hop['username'], e))
            self._become_contexts[key] = ctx
        return ctx

    def _context_for(self, cmd, sudoable):
        """(context, command, shell) for `cmd`: a command Ansible wrapped with
        its become plugin runs unwrapped in the become context, parsed by the
        become plugin's shell; others run in the login context (shell None:
        the login shell)."""
        if sudoable and self.become is not None and self._become_unwrap:
            found = compat.unwrap_become(cmd, self._become_unwrap)
            if found is not None:
                unwrapped, executable = found
                hop = self._become_hop()
                if hop is not None:
                    # The stock chain is: login shell, sudo (which resets the
                    # environment), then the become plugin's shell: no login
                    # shell of the become user in between.
                    return self._become_context(hop), unwrapped, executable
                # Another become method: its command runs as it is, which
                # works when it needs no password.
                if self.become.get_option('become_pass'):
                    raise AnsibleError(
                        'mitogen-native runs become methods %s as contexts; %r with a '
                        'password is not supported' % (', '.join(_BECOME_METHODS),
                                                       compat.become_name(self.become)))
        return self._login_context(), cmd, None

    # -- calls ---------------------------------------------------------------

    def _call(self, ctx, fn, *args, **kwargs):
        try:
            return ctx.call(fn, *args, **kwargs)
        except mitogen_native.core.ChannelError as e:
            # The agent or its connection died: this task fails, the next one
            # connects afresh.
            self._forget_after_failure()
            raise AnsibleError('mitogen-native: the connection to %s was lost: %s'
                               % (self._host_for_display(), e))
        except mitogen_native.core.CallError as e:
            raise AnsibleError('mitogen-native: %s' % (e,))

    def _forget_after_failure(self):
        stack = self._login_stack
        self._login = None
        self._login_stack = None
        self._become_contexts.clear()
        self._connected = False
        if stack:
            try:
                _backend.get_backend().reset(stack)
            except Exception:
                pass

    def _fork_ok(self):
        try:
            return bool(self.get_option(self._fork_option))
        except KeyError:
            return True

    def _exec(self, cmd, in_data, sudoable, use_tty, cwd=None, shell=None):
        # str()/bytes(): Ansible's values are often AnsibleUnicode & co., which
        # the wire refuses (only built-in types cross it).
        cmd = str(to_text(cmd, errors='surrogate_or_strict'))
        ctx, cmd, become_shell = self._context_for(cmd, sudoable)
        display.vvv('EXEC %s' % (cmd,), host=self._host_for_display())
        if in_data is not None:
            in_data = bytes(to_bytes(in_data, errors='surrogate_or_strict'))
        # Under a terminal, sshd sets TERM to the ssh client's (stock: -tt).
        term = os.environ.get('TERM') if use_tty else None
        rc, stdout, stderr = self._call(ctx, mitogen_native_target.exec_command, cmd,
                                        in_data, use_tty, self._fork_ok(), _plain(cwd),
                                        _plain(become_shell or shell), _plain(term),
                                        _warm_modules())
        return rc, stdout, stderr


class SshConnection(ConnectionMixin, ConnectionBase):
    """``mitogen.native.ssh``: Ansible's ssh settings, one persistent agent per
    host (the daemon's, or this worker's), modules run in it."""

    transport = 'mitogen.native.ssh'

    def __init__(self, *args, **kwargs):
        super(SshConnection, self).__init__(*args, **kwargs)
        self.host = self._play_context.remote_addr
        self.user = self._play_context.remote_user

    def _build_login_stack(self, o):
        host = o.get('host') or self._play_context.remote_addr
        self.host = host
        self.user = o.get('remote_user')
        password = o.get('password') or self._play_context.password
        try:
            hops, unsupported = ssh_options.ssh_stack(
                host=_plain(host), port=_plain(o.get('port')), user=_plain(o.get('remote_user')),
                password=_plain(password) or None,
                private_key_file=_plain(o.get('private_key_file')),
                timeout=_plain(o.get('timeout')),
                host_key_checking=o.get('host_key_checking'),
                ssh_args=_plain(o.get('ssh_args')),
                ssh_common_args=_plain(o.get('ssh_common_args')),
                ssh_extra_args=_plain(o.get('ssh_extra_args')),
                python_path=_plain(_python_path(o.get('python_interpreter'))),
                transport=_plain(o.get('ssh_transport') or 'libssh2'),
                ssh_executable=_plain(o.get('ssh_executable')))
        except ValueError as e:
            raise AnsibleError('mitogen-native: %s' % (e,))
        self._unsupported = unsupported
        return hops

    def _warn_unsupported(self):
        for name in getattr(self, '_unsupported', ()):
            compat.warn_once(
                'mitogen-native: the ssh option %s is not supported by the in-process ssh '
                'client and is ignored (set ansible_mitogen_ssh_transport=openssh to use '
                'the ssh binary, which honours it)' % (name,), self._run_id)

    def _host_for_display(self):
        return self.host

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super(SshConnection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        use_tty = bool(not in_data and sudoable and self.get_option('use_tty'))
        return self._exec(cmd, in_data, sudoable, use_tty)

    def put_file(self, in_path, out_path):
        super(SshConnection, self).put_file(in_path, out_path)
        display.vvv('PUT %s TO %s' % (in_path, out_path), host=self.host)
        b_in = to_bytes(in_path, errors='surrogate_or_strict')
        if not os.path.exists(b_in):
            raise AnsibleFileNotFound('file or module does not exist: %s' % (in_path,))
        mode = stat.S_IMODE(os.stat(b_in).st_mode) & 0o777
        self._transfer(self._login_context().put_file, in_path, out_path, mode=mode)

    def fetch_file(self, in_path, out_path):
        super(SshConnection, self).fetch_file(in_path, out_path)
        display.vvv('FETCH %s TO %s' % (in_path, out_path), host=self.host)
        self._transfer(self._login_context().get_file, in_path, out_path)
        # sftp creates the local file with the remote mode, owner-writable,
        # under the local umask: the same here.
        umask = os.umask(0)
        os.umask(umask)
        st = os.stat(out_path)
        os.chmod(out_path, ((stat.S_IMODE(st.st_mode) & 0o777) | 0o200) & ~umask)

    def _transfer(self, fn, src, dst, **kwargs):
        try:
            fn(str(to_text(src)), str(to_text(dst)), **kwargs)
        except mitogen_native.core.FileError as e:
            if e.errno == errno.EPIPE:
                self._forget_after_failure()
            raise AnsibleError('mitogen-native: failed to transfer %s to %s: %s'
                               % (src, dst, e))
        except mitogen_native.core.ChannelError as e:
            self._forget_after_failure()
            raise AnsibleError('mitogen-native: the connection to %s was lost: %s'
                               % (self.host, e))


class LocalConnection(ConnectionMixin, ConnectionBase):
    """``mitogen.native.local``: the controller, through a persistent local
    agent (become as a context, modules forked from the warm agent)."""

    # 'local' makes Ansible's action plugins set self.cwd to the playbook's
    # directory (as for the stock local plugin) and keeps reboot away.
    transport = 'local'

    def __init__(self, *args, **kwargs):
        super(LocalConnection, self).__init__(*args, **kwargs)
        self.cwd = None
        try:
            self.default_user = getpass.getuser()
        except KeyError:
            self.default_user = ''

    def _connect(self):
        self._play_context.remote_user = self.default_user
        return super(LocalConnection, self)._connect()

    def _build_login_stack(self, o):
        hop = {'method': 'local'}
        python_path = _python_path(o.get('python_interpreter'))
        if python_path:
            hop['python_path'] = _plain(python_path)
        return [hop]

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super(LocalConnection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        executable = C.DEFAULT_EXECUTABLE.split()[0] if C.DEFAULT_EXECUTABLE else '/bin/sh'
        cwd = to_text(self.cwd, errors='surrogate_or_strict') if self.cwd else None
        return self._exec(cmd, in_data, sudoable, False, cwd=cwd, shell=executable)

    # Files stay on this machine and belong to this user, as with the stock
    # local plugin: copied here, without a round trip.
    def put_file(self, in_path, out_path):
        super(LocalConnection, self).put_file(in_path, out_path)
        display.vvv('PUT %s TO %s' % (in_path, out_path), host=self._play_context.remote_addr)
        b_in = to_bytes(in_path, errors='surrogate_or_strict')
        if not os.path.exists(b_in):
            raise AnsibleFileNotFound('file or module does not exist: %s' % (in_path,))
        try:
            shutil.copyfile(b_in, to_bytes(out_path, errors='surrogate_or_strict'))
        except shutil.Error:
            raise AnsibleError('failed to copy: %s and %s are the same' % (in_path, out_path))
        except IOError as e:
            raise AnsibleError('failed to transfer file to %s: %s' % (out_path, e))

    def fetch_file(self, in_path, out_path):
        super(LocalConnection, self).fetch_file(in_path, out_path)
        display.vvv('FETCH %s TO %s' % (in_path, out_path), host=self._play_context.remote_addr)
        self.put_file(in_path, out_path)


__all__ = ['SshConnection', 'LocalConnection']
