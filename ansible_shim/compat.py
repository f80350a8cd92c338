"""The places where the plugins depend on how ansible-core 2.14 works inside,
kept together so that a new Ansible version means reading one file.

* become: TaskExecutor gives the connection a become plugin, and action
  plugins wrap commands with ``become.build_become_command(cmd, shell)``. We
  remember each wrapped -> inner pair to run the inner command in a become
  context instead (:func:`remember_become_commands`, :func:`unwrap_become`).
* reset: ``meta: reset_connection`` runs ``connection.reset()`` in the
  top-level process after ``set_options(var_options=all_vars)`` with vars not
  templated (:func:`templated_options`).
* warnings: ``display.warning`` deduplicates per process only and every task
  is a new worker, so a warning meant once per run needs a marker that outlives
  a worker (:func:`warn_once`).
"""
import hashlib
import os
import shlex
import tempfile

from ansible.utils.display import Display

display = Display()

#: Every option the plugins read (both plugins; missing ones read as None).
OPTION_NAMES = ('host', 'port', 'remote_user', 'password', 'private_key_file',
                'timeout', 'host_key_checking', 'ssh_args', 'ssh_common_args',
                'ssh_extra_args', 'ssh_transport', 'ssh_executable',
                'python_interpreter', 'use_tty', 'pipelining', 'fork_modules')


def become_name(plugin):
    """'sudo' for sudo, ansible.builtin.sudo or a collection's sudo."""
    if plugin is None:
        return None
    name = getattr(plugin, '_load_name', None) or getattr(plugin, 'name', '') or ''
    return name.rsplit('.', 1)[-1]


def remember_become_commands(plugin, mapping):
    """Wrap `plugin`'s build_become_command so that each command it wraps is
    recorded in `mapping`: wrapped -> the command to run instead in a become
    context (``<shell> -c <inner>``, as the plugin's own success wrapper runs
    it, minus the privilege program and the success marker)."""
    if getattr(plugin, '_mitogen_native_wrapped', False):
        return
    original = plugin.build_become_command

    def build_become_command(cmd, shell):
        wrapped = original(cmd, shell)
        if cmd and wrapped and wrapped != cmd:
            exe = getattr(shell, 'executable', None)
            inner = '%s -c %s' % (exe, shlex.quote(cmd)) if exe else cmd
            mapping[str(wrapped)] = (str(inner), str(exe) if exe else None)
        return wrapped

    plugin.build_become_command = build_become_command
    plugin._mitogen_native_wrapped = True


def _escaped(text):
    """How `text` looks inside a shlex.quote()d string."""
    return text.replace("'", "'\"'\"'")


def unwrap_become(cmd, mapping):
    """``(command, shell)``: `cmd` with the become-wrapped command inside it
    replaced by what should run in the become context, and the shell the
    become plugin would have run it with; None if `cmd` holds no wrapped
    command we recorded. Ansible puts the wrapped command inside
    ``<executable> -c '<wrapped> && sleep 0'``, or leaves it bare."""
    for wrapped, (inner, shell) in mapping.items():
        if wrapped in cmd:
            return cmd.replace(wrapped, inner, 1), shell
        esc = _escaped(wrapped)
        if esc != wrapped and esc in cmd:
            return cmd.replace(esc, _escaped(inner), 1), shell
    return None


def current_options(plugin):
    """The plugin's options as Ansible resolved them for this task."""
    out = {}
    for name in OPTION_NAMES:
        try:
            out[name] = plugin.get_option(name)
        except KeyError:
            out[name] = None
    return out


def templated_options(plugin, var_options):
    """As current_options(), with values that are still templates rendered
    against `var_options` (the top-level process hands reset() raw vars)."""
    out = current_options(plugin)
    templar = None
    for name, value in out.items():
        if isinstance(value, str) and ('{{' in value or '{%' in value):
            if templar is None:
                from ansible.parsing.dataloader import DataLoader
                from ansible.template import Templar
                templar = Templar(loader=DataLoader(), variables=dict(var_options or {}))
            try:
                out[name] = templar.template(value)
            except Exception as e:
                display.vvv('mitogen-native: cannot template %s: %s' % (name, e))
    return out


def _marker_dir():
    d = os.path.join(tempfile.gettempdir(), 'mitogen-native-%d' % os.getuid())
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if st.st_uid != os.getuid() or (st.st_mode & 0o077):
        return None    # not ours, or others may write there: do not trust it
    return d


def warn_once(message, run_id):
    """display.warning(message) once per ansible-playbook run (`run_id`: the
    run's pid), whichever worker gets there first."""
    try:
        d = _marker_dir()
    except OSError:
        d = None
    if d is None:
        display.warning(message)
        return
    digest = hashlib.sha1(message.encode('utf-8', 'replace')).hexdigest()[:16]
    path = os.path.join(d, 'warned-%s-%s' % (run_id, digest))
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return
    except OSError:
        pass
    display.warning(message)
    _forget_old_runs(d)


def _forget_old_runs(d):
    """Remove markers of runs whose process is gone."""
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        parts = name.split('-')
        if len(parts) != 3 or parts[0] != 'warned' or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(d, name))
            except OSError:
                pass
        except OSError:
            pass
