"""Module forwarding through the Python API: the child runs code only this
program has, including functions of the main script."""
import os
import subprocess
import sys
import textwrap

import pytest

import mitogen_native.master


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
