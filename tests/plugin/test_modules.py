"""Module forwarding through the Python API: the child runs code only this
program has, including functions of the main script, resolved against the live
program (sys.modules, sys.path, sys.meta_path) when the child asks, locally,
through via= and over ssh."""
import importlib
import importlib.abc
import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
import zipfile

import pytest

import mitogen_native.core
import mitogen_native.master

import module_helpers
from helpers import run_script as run_code
from servers import CAN_RUN_SSHD, ssh_kwargs


def run_script(tmp_path, body):
    script = tmp_path / 'prog.py'
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ)
    # The package under test, wherever this test imported it from.
    pkg_root = os.path.dirname(os.path.dirname(mitogen_native.master.__file__))
    env['PYTHONPATH'] = os.pathsep.join([pkg_root, env.get('PYTHONPATH', '')])
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, env=env, cwd=str(tmp_path))


def test_module_only_the_controller_has(tmp_path, monkeypatch):
    pkg = tmp_path / 'onlyhere_pkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'helper.py').write_text('def double(x):\n    return 2 * x\n')
    (pkg / 'tasks.py').write_text(
        'from onlyhere_pkg import helper\n'
        'import os\n'
        'def run(x):\n    return helper.double(x), os.getpid()\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import onlyhere_pkg.tasks
    broker = mitogen_native.master.Broker()
    try:
        router = mitogen_native.master.Router(broker)
        ctx = router.local()
        value, pid = ctx.call(onlyhere_pkg.tasks.run, 21)
        assert value == 42
        assert pid != os.getpid()
    finally:
        broker.shutdown()
        broker.join()


def test_function_in_main_script(tmp_path):
    result = run_script(tmp_path, '''
        import os
        import mitogen_native.master

        def where(tag):
            return tag, os.getpid()

        if __name__ == '__main__':
            broker = mitogen_native.master.Broker()
            router = mitogen_native.master.Router(broker)
            ctx = router.local()
            tag, pid = ctx.call(where, 'from-main')
            assert tag == 'from-main' and pid != os.getpid(), (tag, pid)
            print('OK', pid)
            broker.shutdown()
            broker.join()
    ''')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('OK ')


def test_missing_module_fails_quickly(tmp_path):
    result = run_script(tmp_path, '''
        import time
        import mitogen_native.master
        import mitogen_native.core

        if __name__ == '__main__':
            broker = mitogen_native.master.Broker()
            router = mitogen_native.master.Router(broker)
            ctx = router.local()
            t0 = time.monotonic()
            try:
                ctx.call(time.sleep, 0) and None
                ctx.call_async  # noqa
                import types
                fake = types.FunctionType((lambda: None).__code__, {}, 'nothing_here')
                fake.__module__ = 'no_such_pkg_anywhere'
                fake.__qualname__ = 'nothing_here'
                ctx.call(fake)
            except mitogen_native.core.CallError as e:
                assert 'ModuleNotFoundError' in str(e), str(e)
                print('OK', round(time.monotonic() - t0, 3))
            broker.shutdown()
            broker.join()
    ''')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('OK ')
    assert float(result.stdout.split()[1]) < 2.0


# ---- the live program: modules that appear after the Router was made --------

class _Maker(object):
    """Starts contexts one way (`method`): directly, through a fresh intermediary
    each (via=), or over the loopback sshd. The Router is made on first use, so a
    test decides whether it exists before its modules do."""

    def __init__(self, broker, method, sshd):
        self.method = method
        self._broker = broker
        self._sshd = sshd
        self._router = None
        self.last_via = None

    @property
    def router(self):
        if self._router is None:
            self._router = mitogen_native.master.Router(self._broker)
        return self._router

    def context(self):
        if self.method == 'local':
            return self.router.local()
        if self.method == 'via':
            self.last_via = self.router.local()
            return self.router.local(via=self.last_via)
        return self.router.ssh(**ssh_kwargs(self._sshd))

    def requester_id(self, ctx):
        """The context whose GET_MODULE reaches this program for `ctx`."""
        return (self.last_via if self.method == 'via' else ctx).context_id


@pytest.fixture(params=['local', 'via', 'ssh'])
def make(request, broker):
    sshd = None
    if request.param == 'ssh':
        if not CAN_RUN_SSHD:
            pytest.skip('needs root and openssh-server for a loopback sshd')
        sshd = request.getfixturevalue('sshd')
    return _Maker(broker, request.param, sshd)


@pytest.fixture(autouse=True)
def _import_state(monkeypatch):
    """Give back sys.path, sys.meta_path and sys.path_hooks as they were, and
    forget the test's modules (all named lm_*)."""
    monkeypatch.setattr(sys, 'path', list(sys.path))
    monkeypatch.setattr(sys, 'meta_path', list(sys.meta_path))
    monkeypatch.setattr(sys, 'path_hooks', list(sys.path_hooks))
    yield
    for name in [n for n in sys.modules if n.startswith('lm_')]:
        del sys.modules[name]
    for key in [k for k in sys.path_importer_cache if 'lm_' in k or k.startswith('<lm-')]:
        del sys.path_importer_cache[key]
    importlib.invalidate_caches()


def write_tree(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def add_to_path(directory):
    sys.path.insert(0, str(directory))
    importlib.invalidate_caches()


def fake_function(module, name='f'):
    """A module-level function of `module`, as far as call() can tell."""
    def f():
        pass
    f.__module__ = module
    f.__name__ = f.__qualname__ = name
    return f


def test_module_made_after_the_router(make, tmp_path):
    # The reproduction: Router first, then the module and its directory.
    router = make.router
    write_tree(tmp_path, {'lm_late.py': """
        import os
        def fn(x):
            return x * 2, os.getpid()
    """})
    add_to_path(tmp_path)
    import lm_late
    ctx = make.context()
    value, pid = ctx.call(lm_late.fn, 21)
    assert value == 42 and pid != os.getpid()
    assert router._module_stats()['modules_sent'] >= 1


def test_package_submodules_and_relative_imports(make, tmp_path):
    make.router
    write_tree(tmp_path, {
        'lm_pkg/__init__.py': 'from .core import BASE\n',
        'lm_pkg/core.py': 'BASE = 40\n',
        'lm_pkg/sub/__init__.py': '',
        'lm_pkg/sub/leaf.py': 'TWO = 2\n',
        'lm_pkg/sub/later.py': 'X = "never imported here"\n',
        'lm_pkg/sub/tasks.py': """
            from .. import core
            from . import leaf
            from lm_pkg import BASE
            def run():
                return core.BASE + leaf.TWO + BASE - 40
            def lazy():
                from . import later
                return later.X
        """,
    })
    add_to_path(tmp_path)
    import lm_pkg.sub.tasks
    ctx = make.context()
    assert ctx.call(lm_pkg.sub.tasks.run) == 42
    # A submodule this program never imported: found under its parent's __path__.
    assert ctx.call(lm_pkg.sub.tasks.lazy) == 'never imported here'
    assert ctx.call(module_helpers.module_file, 'lm_pkg.sub.leaf') == \
        'master:' + str(tmp_path / 'lm_pkg' / 'sub' / 'leaf.py')


def test_namespace_package(make, tmp_path):
    make.router
    write_tree(tmp_path, {
        'a/lm_ns/one.py': """
            def both():
                from lm_ns import two
                return 'one+' + two.NAME
        """,
        'b/lm_ns/two.py': 'NAME = "two"\n',
    })
    add_to_path(tmp_path / 'b')
    add_to_path(tmp_path / 'a')
    import lm_ns.one
    ctx = make.context()
    assert ctx.call(lm_ns.one.both) == 'one+two'


def test_module_inside_a_zip(make, tmp_path):
    make.router
    archive = tmp_path / 'lm_lib.zip'
    with zipfile.ZipFile(str(archive), 'w') as z:
        z.writestr('lm_zmod.py', 'def fn():\n    from lm_zpkg import inner\n'
                                 '    return inner.X, __file__\n')
        z.writestr('lm_zpkg/__init__.py', '')
        z.writestr('lm_zpkg/inner.py', '# -*- coding: utf-8 -*-\nX = "caf\xc3\xa9"\n'.encode('latin-1'))
    add_to_path(archive)
    import lm_zmod
    ctx = make.context()
    assert ctx.call(lm_zmod.fn) == (u'caf\xe9', 'master:' + str(archive / 'lm_zmod.py'))


class VirtualModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A sys.meta_path hook serving modules from a dict, nowhere on disk; its
    path hook lets pkgutil list a package's submodules (Ansible's collection
    loader is built the same way)."""
    PREFIX = '<lm-virtual>'

    def __init__(self, sources):
        self.sources = sources   # fullname -> (source, is_package)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.sources:
            return None
        is_pkg = self.sources[fullname][1]
        where = self.PREFIX + '/' + fullname.replace('.', '/')
        spec = importlib.util.spec_from_loader(
            fullname, self, origin=where + ('/__init__.py' if is_pkg else '.py'), is_package=is_pkg)
        if is_pkg:
            spec.submodule_search_locations = [where]
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(compile(self.get_source(module.__name__), module.__spec__.origin, 'exec'),
             module.__dict__)

    def get_source(self, fullname):
        return self.sources[fullname][0]

    def path_hook(self, entry):
        if not entry.startswith(self.PREFIX + '/'):
            raise ImportError(entry)
        return _VirtualDir(self, entry[len(self.PREFIX) + 1:].replace('/', '.'))


class _VirtualDir(object):
    def __init__(self, owner, package):
        self.owner, self.package = owner, package

    def find_spec(self, fullname, target=None):
        return self.owner.find_spec(fullname)

    def iter_modules(self, prefix=''):
        for name, (_, is_pkg) in sorted(self.owner.sources.items()):
            parent, _, leaf = name.rpartition('.')
            if parent == self.package:
                yield prefix + leaf, is_pkg


def test_module_only_a_meta_path_finder_provides(make):
    make.router
    finder = VirtualModules({
        'lm_virtual': ('def fn():\n'
                       '    import lm_virtual_pkg.part\n'
                       '    return lm_virtual_pkg.part.VALUE, __file__\n', False),
        'lm_virtual_pkg': ('', True),
        'lm_virtual_pkg.part': ('VALUE = "from the hook"\n', False),
    })
    sys.meta_path.append(finder)
    sys.path_hooks.insert(0, finder.path_hook)
    import lm_virtual
    ctx = make.context()
    # lm_virtual_pkg was never imported here: found through the hook at request time.
    assert ctx.call(lm_virtual.fn) == ('from the hook', 'master:<lm-virtual>/lm_virtual.py')


def test_an_edited_module_reaches_contexts_started_after_the_edit(make, tmp_path):
    write_tree(tmp_path, {'lm_edit.py': 'def v():\n    return "one"\n'})
    add_to_path(tmp_path)
    make.router   # after: what changes here is the file, nothing else
    import lm_edit
    first = make.context()
    assert first.call(lm_edit.v) == 'one'
    # Same size, most likely the same mtime: only the content differs.
    (tmp_path / 'lm_edit.py').write_text('def v():\n    return "two"\n')
    second = make.context()
    assert second.call(lm_edit.v) == 'two'
    assert first.call(lm_edit.v) == 'one'   # a context keeps the copy it has


def test_the_standard_library_is_not_served(make):
    router = make.router
    ctx = make.context()
    for name in ('json', 'email.mime.text', 'os', 'mitogen_native._native'):
        path, has_source, _ = ctx.call(module_helpers.ask, name)
        assert (path, has_source) == (None, False), name
    # A module outside the standard library is, through the same path.
    path, has_source, _ = ctx.call(module_helpers.ask, 'module_helpers')
    assert path == module_helpers.__file__ and has_source
    assert router._module_stats()['modules_sent'] >= 1


def test_what_the_program_cannot_import_is_refused(make, tmp_path):
    gone = tmp_path / 'gone'
    write_tree(gone, {'lm_gone.py': 'X = 1\n', 'lm_notpkg.py': 'X = 1\n'})
    (tmp_path / 'secret.txt').write_text('SECRET = "leaked"\n')
    os.symlink(str(tmp_path / 'secret.txt'), str(gone / 'lm_evil.py'))
    add_to_path(gone)
    router = make.router          # made while `gone` is on sys.path...
    sys.path.remove(str(gone))    # ...which the program then drops
    importlib.invalidate_caches()
    ctx = make.context()
    for name in ('lm_gone', 'lm_notpkg.sub', 'lm_never_anywhere'):
        assert ctx.call(module_helpers.ask, name)[:2] == (None, False), name
    with pytest.raises(mitogen_native.core.CallError) as e:
        ctx.call(fake_function('lm_gone'))
    assert e.value.type_name == 'builtins.ModuleNotFoundError'
    assert "No module named 'lm_gone'" in str(e.value)
    # On sys.path again (lm_notpkg was never asked for: an intermediary keeps the
    # negative answers it got): served. A symlink to something that is not a .py
    # source is still refused, though the program's finder would find it.
    add_to_path(gone)
    assert ctx.call(module_helpers.ask, 'lm_notpkg')[:2] == (str(gone / 'lm_notpkg.py'), True)
    assert ctx.call(module_helpers.ask, 'lm_evil')[:2] == (None, False)
    assert router._module_stats()['refused'] >= 1


def test_related_modules_come_with_the_request(make, tmp_path):
    router = make.router
    write_tree(tmp_path, {
        'lm_rel/__init__.py': '',
        'lm_rel/a.py': 'from lm_rel import b\ndef run():\n    return b.f()\n',
        'lm_rel/b.py': 'from . import c\ndef f():\n    return c.X\n',
        'lm_rel/c.py': 'X = 7\n',
    })
    add_to_path(tmp_path)
    import lm_rel.a
    ctx = make.context()
    assert ctx.call(lm_rel.a.run) == 7
    # Asked for lm_rel and lm_rel.a; b and c came along with a.
    assert router._module_stats()['requests'] == 2
    assert set(router._modules_sent_to(make.requester_id(ctx))) >= {
        'lm_rel', 'lm_rel.a', 'lm_rel.b', 'lm_rel.c'}


class _SlowFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Provides lm_slow, but only once `release` is set."""
    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'lm_slow':
            return None
        self.threads.add(threading.get_ident())
        self.entered.set()
        self.release.wait(60)
        return importlib.util.spec_from_loader(fullname, self, origin='<lm-slow>')

    def get_source(self, fullname):
        return 'VALUE = "slow"\n'


def test_a_slow_lookup_holds_up_no_other_context(router):
    finder = _SlowFinder()
    sys.meta_path.append(finder)
    a, b = router.local(), router.local()
    pending = a.call_async(module_helpers.import_attr, 'lm_slow', 'VALUE')
    assert finder.entered.wait(30)
    # The lookup runs (in Python, with the GIL) on the responder's worker thread:
    # the broker still carries everything else.
    assert b.call(os.getpid) != os.getpid()
    assert not pending.ready()
    finder.release.set()
    assert pending.get(timeout=30) == 'slow'
    assert threading.get_ident() not in finder.threads


STOPPED_AT_EXIT = r"""
import os, sys, tempfile
import mitogen_native.core, mitogen_native.master
from mitogen_native import _native
router = mitogen_native.master.Router()
ctx = router.local()
d = tempfile.mkdtemp()
for name, value in (('lm_before', 5), ('lm_after', 6)):
    with open(os.path.join(d, name + '.py'), 'w') as f:
        f.write('def f():\n    return %d\n' % value)
sys.path.insert(0, d)
import lm_before, lm_after
assert ctx.call(lm_before.f) == 5
_native._stop_module_resolvers()   # what atexit runs before the interpreter finalizes
try:
    ctx.call(lm_after.f)
    print('served after stop')
except mitogen_native.core.CallError as e:
    print('refused after stop:', e.type_name)
"""


def test_resolvers_stop_before_the_interpreter_finalizes():
    proc = run_code(STOPPED_AT_EXIT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'refused after stop: builtins.ModuleNotFoundError' in proc.stdout
    assert 'terminate' not in proc.stderr


STOP_WHILE_LOOKING_UP = r"""
import os, sys, threading
sys.path.insert(0, %(here)r)
import mitogen_native.core, mitogen_native.master
from mitogen_native import _native
import module_helpers
from test_modules import _SlowFinder
finder = _SlowFinder()
sys.meta_path.append(finder)
router = mitogen_native.master.Router()
ctx = router.local()
pending = ctx.call_async(module_helpers.import_attr, 'lm_slow', 'VALUE')
assert finder.entered.wait(30)
# The main thread holds the GIL the lookup in progress needs: stopping must let
# it go while it waits for that lookup to finish.
stopper = threading.Thread(target=_native._stop_module_resolvers)
stopper.start()
stopper.join(0.5)
print('stop waited:', stopper.is_alive())
finder.release.set()
stopper.join(30)
print('stopped:', not stopper.is_alive())
print('in flight:', pending.get(timeout=30))
try:
    ctx.call(module_helpers.import_attr, 'lm_other', 'X')
except mitogen_native.core.CallError as e:
    print('after stop:', e.type_name)
"""


def test_stopping_the_resolvers_waits_for_a_lookup_in_progress():
    here = os.path.dirname(os.path.abspath(__file__))
    proc = run_code(STOP_WHILE_LOOKING_UP % {'here': here}, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert 'stop waited: True' in proc.stdout
    assert 'stopped: True' in proc.stdout
    assert 'in flight: slow' in proc.stdout
    assert 'after stop: builtins.ModuleNotFoundError' in proc.stdout
    assert 'terminate' not in proc.stderr
