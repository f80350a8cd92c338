"""The agent's module importer (GET_MODULE / LOAD_MODULE), driven through the
fake master, which serves modules that exist nowhere on the child's path."""

import textwrap
import time
import zlib

import pytest

import fake_master as fm
from fake_master import RemoteError


def src(text):
    return textwrap.dedent(text).lstrip('\n')


ONLYHERE = src('''
    def fn(x):
        return ('onlyhere', x)

    def where():
        return __file__, __name__
''')

PKG_INIT = src('''
    VERSION = 3
''')

PKG_MOD = src('''
    from . import util
    from pkg.sub import leaf

    def fn(x):
        return util.double(x) + leaf.ONE

    def fail():
        raise ValueError('served and failing')
''')

PKG_UTIL = src('''
    def double(x):
        return 2 * x
''')

PKG_SUB_LEAF = src('''
    ONE = 1
''')


def serve_pkg(m, related=False):
    m.serve_module('pkg', PKG_INIT, submodules=['mod', 'sub', 'util'],
                   path='/fake/pkg/__init__.py',
                   related=['pkg.mod', 'pkg.sub', 'pkg.sub.leaf', 'pkg.util']
                   if related else ())
    m.serve_module('pkg.mod', PKG_MOD)
    m.serve_module('pkg.util', PKG_UTIL)
    m.serve_module('pkg.sub', '', submodules=['leaf'],
                   path='/fake/pkg/sub/__init__.py')
    m.serve_module('pkg.sub.leaf', PKG_SUB_LEAF)


# -- the basics --------------------------------------------------------------

def test_module_only_the_master_has(master):
    master.serve_module('onlyhere', ONLYHERE)
    assert master.call('onlyhere', 'fn', 5) == ('onlyhere', 5)
    assert master.requested_names() == ['onlyhere']
    file, name = master.call('onlyhere', 'where')
    assert (file, name) == ('master:/fake/onlyhere.py', 'onlyhere')
    # Cached: a second call does not ask again.
    master.call('onlyhere', 'fn', 6)
    assert master.requested_names() == ['onlyhere']


def test_get_module_wire_shape(master):
    master.serve_module('onlyhere', ONLYHERE)
    master.call('onlyhere', 'fn', 1)
    (req,) = master.module_requests
    assert req.handle == fm.GET_MODULE
    assert req.dst_id == 0 and req.src_id == req.auth_id == 1
    assert req.data == b'onlyhere'          # plain UTF-8, not pickled
    assert req.reply_to >= 1000             # answered by LOAD_MODULE, though


def test_package_with_submodules(master):
    serve_pkg(master)
    assert master.call('pkg.mod', 'fn', 20) == 41
    # Parents first, each once; relative and absolute imports both fetched.
    assert master.requested_names() == [
        'pkg', 'pkg.mod', 'pkg.util', 'pkg.sub', 'pkg.sub.leaf']
    assert master.call('builtins', 'eval',
                       '__import__("pkg").__path__') == []
    assert master.call('builtins', 'eval',
                       '__import__("pkg").__file__') == \
        'master:/fake/pkg/__init__.py'


def test_related_modules_arrive_with_the_answer(master):
    serve_pkg(master, related=True)
    assert master.call('pkg.mod', 'fn', 1) == 3
    # Everything came with the answer for 'pkg': one round trip in all.
    assert master.requested_names() == ['pkg']


def test_unlisted_submodule_costs_no_round_trip(master):
    serve_pkg(master)
    assert master.call('builtins', 'eval', '__import__("pkg").VERSION') == 3
    with pytest.raises(RemoteError) as info:
        master.call('pkg.nothere', 'f')
    assert "ModuleNotFoundError: No module named 'pkg.nothere'" in \
        info.value.args[0]
    assert master.requested_names() == ['pkg']


def test_missing_module_is_a_quick_cached_error(master):
    master.serve_module('onlyhere', ONLYHERE)
    for _ in range(2):
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as info:
            master.call('absent_everywhere', 'f')
        assert time.monotonic() - t0 < 8   # an answer, not the 10 s timeout
        assert info.value.args[0].startswith(
            "builtins.ModuleNotFoundError: No module named "
            "'absent_everywhere'")
    assert master.requested_names() == ['absent_everywhere']


def test_no_responder_means_module_not_found(master):
    # modules is None: the master answers the reply handle with a dead
    # message, as a router without a GET_MODULE handler does.
    with pytest.raises(RemoteError, match="No module named 'nowhere_xyz'"):
        master.call('nowhere_xyz', 'f')
    with pytest.raises(RemoteError, match="No module named 'nowhere_xyz'"):
        master.call('nowhere_xyz', 'f')
    assert master.requested_names() == ['nowhere_xyz']


def test_local_modules_are_never_fetched(master):
    master.serve_module('json', 'raise SystemExit("served json ran")')
    assert master.call('json', 'dumps', [1]) == '[1]'
    assert master.call('agent_testmod', 'echo', 7) == 7   # on PYTHONPATH
    # A missing submodule of a local package stays missing, unasked.
    with pytest.raises(RemoteError, match="No module named 'json.nosuch'"):
        master.call('json.nosuch', 'f')
    # Windows and Python 2 names that stdlib probes for are not asked for.
    with pytest.raises(RemoteError, match='ModuleNotFoundError'):
        master.call('msvcrt', 'getch')
    assert master.requested_names() == []


def test_traceback_shows_served_source(master):
    serve_pkg(master)
    with pytest.raises(RemoteError) as info:
        master.call('pkg.mod', 'fail')
    text = info.value.args[0]
    assert text.startswith('builtins.ValueError: served and failing')
    assert 'File "master:/fake/pkg/mod.py", line 8, in fail' in text
    assert "raise ValueError('served and failing')" in text


# -- threads and ordering ----------------------------------------------------

THREADED = src('''
    import threading

    def import_in_threads(names):
        results = {}

        def run(name):
            try:
                results[name] = __import__(name).VALUE
            except Exception as e:
                results[name] = repr(e)

        threads = [threading.Thread(target=run, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        return results

    _late = {}

    def import_later(name):
        def run():
            _late[name] = __import__(name).VALUE
        threading.Thread(target=run, daemon=True).start()

    def late_result(name):
        import time
        deadline = time.monotonic() + 30
        while name not in _late and time.monotonic() < deadline:
            time.sleep(0.01)
        return _late.get(name)
''')


def test_threads_import_while_main_thread_waits_for_them(master):
    # The main thread is inside a call (not reading): the importing threads
    # must read their answers themselves, and share one request per name.
    master.serve_module('threaded', THREADED)
    for name in ('va', 'vb'):
        master.serve_module(name, 'import time\ntime.sleep(0.05)\n'
                            'VALUE = %r\n' % name)
    got = master.call('threaded', 'import_in_threads',
                      ['va', 'vb', 'va', 'vb', 'missing_v'])
    assert got['va'] == 'va' and got['vb'] == 'vb'
    assert 'ModuleNotFoundError' in got['missing_v']
    names = master.requested_names()
    assert sorted(names) == ['missing_v', 'threaded', 'va', 'vb']


def test_thread_imports_while_main_thread_idle(master):
    master.serve_module('threaded', THREADED)
    master.serve_module('vc', 'VALUE = "vc"\n')
    master.call('threaded', 'import_later', 'vc')
    assert master.call('threaded', 'late_result', 'vc') == 'vc'


def test_calls_queue_behind_a_waiting_import(master):
    master.serve_module('onlyhere', ONLYHERE)
    master.answer_modules = False
    h1, h2 = master.new_handle(), master.new_handle()
    master.send(fm.CALL_FUNCTION, master.call_payload('onlyhere', 'fn', (1,)),
                reply_to=h1)
    request = master.recv(handle=fm.GET_MODULE)
    assert request.data == b'onlyhere'
    # The main thread waits for the module; a call arriving meanwhile is
    # queued, not run, and not lost.
    master.send(fm.CALL_FUNCTION, master.call_payload('os', 'getpid'),
                reply_to=h2)
    time.sleep(0.1)
    master.send_load_module('onlyhere')
    first, second = master.recv(), master.recv()
    assert first.handle == h1 and master.result(first) == ('onlyhere', 1)
    assert second.handle == h2 and master.result(second) == master.pid


def test_nested_imports_inside_a_call(master):
    master.serve_module('na', 'import nb\nVALUE = nb.VALUE + 1\n')
    master.serve_module('nb', 'import nc\nVALUE = nc.VALUE + 1\n')
    master.serve_module('nc', 'VALUE = 1\n')
    assert master.call('builtins', 'eval', '__import__("na").VALUE') == 3
    assert master.requested_names() == ['na', 'nb', 'nc']


# -- __main__ ----------------------------------------------------------------

def test_main_script_functions(master):
    # As upstream masters serve it: the script cut before its guard.
    master.serve_module('__main__', 'import os\n\ndef pid():\n'
                        '    return os.getpid(), __name__\n',
                        path='/home/u/run.py')
    assert master.call('__main__', 'pid') == (master.pid, '__main__')
    assert master.call('builtins', 'eval',
                       '__import__("sys").modules["__main__"].__file__') == \
        'master:/home/u/run.py'
    assert master.requested_names() == ['__main__']


def test_main_script_absent(master):
    master.serve_module('onlyhere', ONLYHERE)
    with pytest.raises(RemoteError) as info:
        master.call('__main__', 'f')
    assert 'ModuleNotFoundError' in info.value.args[0]
    assert 'no main script' in info.value.args[0]
    # The bootstrap's own __main__ is still in place.
    assert master.call('builtins', 'eval',
                       '"__main__" in __import__("sys").modules') is True


# -- allow and deny lists, hostile or odd answers ----------------------------

def test_blacklist_and_whitelist_from_config(spawn):
    m = spawn(config_extra={'blacklist': ['secret'],
                            'whitelist': ['pkg', 'secret']})
    serve_pkg(m)
    m.serve_module('secretive', 'VALUE = 1\n')
    m.serve_module('onlyhere', ONLYHERE)
    assert m.call('pkg.mod', 'fn', 1) == 3
    for name in ('secretive', 'onlyhere'):
        with pytest.raises(RemoteError, match='ModuleNotFoundError'):
            m.call(name, 'f')
    assert 'secretive' not in m.requested_names()
    assert 'onlyhere' not in m.requested_names()


def test_malformed_load_module_releases_the_waiter(master):
    master.answer_modules = False
    h = master.new_handle()
    master.send(fm.CALL_FUNCTION, master.call_payload('badmod', 'f'),
                reply_to=h)
    master.recv(handle=fm.GET_MODULE)
    master.send(fm.LOAD_MODULE, fm.encode(('badmod', 'not a list', None,
                                           None, [])))
    with pytest.raises(RemoteError, match="No module named 'badmod'"):
        master.result(master.recv(handle=h))
    master.wait_for_log(lambda r: 'refused LOAD_MODULE' in r[2])
    assert master.call('os', 'getpid') == master.pid


def test_load_module_from_a_stranger_is_dropped(master):
    payload = fm.encode(('stranger', None, '/x.py',
                         fm.Blob(zlib.compress(b'VALUE = 1\n')), []))
    master.send(fm.LOAD_MODULE, payload, src_id=5)   # auth_id 5: not a parent
    master.wait_for_log(lambda r: 'not an ancestor' in r[2])
    with pytest.raises(RemoteError, match="No module named 'stranger'"):
        master.call('stranger', 'f')


def test_unsolicited_answers_are_cached(master):
    master.serve_module('pushed', 'VALUE = "pushed"\n')
    master.send_load_module('pushed')
    assert master.call('builtins', 'eval',
                       '__import__("pushed").VALUE') == 'pushed'
    assert master.requested_names() == []
