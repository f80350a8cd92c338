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
* module building: ``module_common.recursive_finder`` parses (``compile`` to
  an AST) and walks (``ModuleDepFinder``) the module and every module_utils
  file it pulls in, for each module, in each run (its ``ansiballz_cache``
  lives in the run's local temporary directory); the imports found depend only
  on a file's bytes, its dotted name and whether it is a package's
  ``__init__``, so :func:`cache_module_deps` keeps them on disk by those.
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


# ---------------------------------------------------------------------------
# Module building: the imports ModuleDepFinder finds, kept by file content.

#: MITOGEN_NATIVE_MODULE_DEPS=0 in the controller's environment: Ansible
#: parses every module_utils file for each module build, as without us.
DEPS_ENV = 'MITOGEN_NATIVE_MODULE_DEPS'
_DEPS_VERSION = b'1'


class _Source(object):
    """What our ``compile`` gives recursive_finder instead of an AST: the
    source, its digest, the AST if it had to be parsed, and the imports
    known for it ({(dotted name, is package init): (submodules, optional)})."""
    __slots__ = ('source', 'digest', 'tree', 'known')

    def __init__(self, source, digest, tree, known):
        self.source = source
        self.digest = digest
        self.tree = tree
        self.known = known


def _well_formed(item):
    """True if a cached entry is [[name parts...], [name parts...]] of strings."""
    return (isinstance(item, list) and len(item) == 2 and
            all(isinstance(names, list) and
                all(isinstance(m, list) and m and all(isinstance(x, str) for x in m)
                    for m in names)
                for names in item))


def cache_module_deps(directory=None):
    """Make Ansible's module building (``recursive_finder``, in this process:
    a worker) keep what ``ModuleDepFinder`` found in each file, in files under
    `directory` (default: ``module-deps`` in this user's private directory),
    keyed by the file's SHA-256, its dotted name, whether it is a package's
    ``__init__``, and the versions of Ansible (and of module_common.py's file)
    and Python. The same files are then found in the same order, read and
    zipped as before; only the parse and the walk of a file seen before are
    skipped. A syntax error is still raised by the real compile. Returns True
    if the cache is in place."""
    if os.environ.get(DEPS_ENV, '1').strip() == '0':
        return False
    from ansible.executor import module_common as mc
    if getattr(mc, '_mitogen_native_deps', None) is not None:
        return True
    if directory is None:
        try:
            base = _marker_dir()
        except OSError:
            return False
        if base is None:
            return False
        directory = os.path.join(base, 'module-deps')
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    import ast
    import builtins
    import json
    import sys
    from ansible.release import __version__
    real_compile = builtins.compile
    st = os.stat(mc.__file__)
    salt = b'\0'.join([_DEPS_VERSION, __version__.encode(), sys.version.encode(),
                       b'%d:%d' % (st.st_mtime_ns, st.st_size)])

    def path_of(digest):
        return os.path.join(directory, hashlib.sha256(salt + digest).hexdigest())

    def load(digest):
        try:
            with open(path_of(digest)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def store(entry):
        path = path_of(entry.digest)
        tmp = '%s.%d.tmp' % (path, os.getpid())
        try:
            with open(tmp, 'w') as f:
                json.dump(entry.known, f)
            os.rename(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def compile_(source, filename, mode, flags=0, *args, **kwargs):
        if not (filename == '<unknown>' and mode == 'exec' and flags == ast.PyCF_ONLY_AST
                and not args and not kwargs and isinstance(source, (bytes, str))):
            return real_compile(source, filename, mode, flags, *args, **kwargs)
        # (text: a package __init__ that the collection loader made up)
        digest = hashlib.sha256(b'b' + source if isinstance(source, bytes) else
                                b's' + source.encode('utf-8', 'surrogatepass')).digest()
        known = load(digest)
        if not isinstance(known, dict):
            # Never seen (or unreadable): parse now, so that a syntax error
            # comes from here as recursive_finder expects.
            return _Source(source, digest, real_compile(source, filename, mode, flags), {})
        return _Source(source, digest, None, known)

    real_init = mc.ModuleDepFinder.__init__

    def finder_init(self, module_fqn, tree, is_pkg_init=False, *args, **kwargs):
        # (the class stays: its __init__ calls super(ModuleDepFinder, self))
        if not isinstance(tree, _Source) or args or kwargs:
            return real_init(self, module_fqn, tree, is_pkg_init, *args, **kwargs)
        key = '%s|%d' % (module_fqn, bool(is_pkg_init))
        item = tree.known.get(key)
        if _well_formed(item):
            self.module_fqn = module_fqn
            self.is_pkg_init = is_pkg_init
            self.submodules = set(tuple(m) for m in item[0])
            self.optional_imports = set(tuple(m) for m in item[1])
            return
        if tree.tree is None:
            tree.tree = real_compile(tree.source, '<unknown>', 'exec', ast.PyCF_ONLY_AST)
        real_init(self, module_fqn, tree.tree, is_pkg_init)
        tree.known[key] = [sorted(self.submodules), sorted(self.optional_imports)]
        store(tree)

    mc.compile = compile_
    mc.ModuleDepFinder.__init__ = finder_init
    mc._mitogen_native_deps = directory
    return True
