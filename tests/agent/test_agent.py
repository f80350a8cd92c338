"""End-to-end tests of the agent, driven through the fake master."""

import errno
import os
import pickle
import subprocess
import time

import pytest

import fake_master as fm
from fake_master import RemoteError


def _gone_within(m, seconds):
    """True if the agent exits within `seconds`."""
    try:
        m.proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


# -- bootstrap ---------------------------------------------------------------

def test_bootstrap_sets_process_name(spawn):
    m = spawn(name='alice@box:123')
    with open('/proc/%d/cmdline' % m.pid, 'rb') as f:
        argv = f.read().split(b'\0')
    assert argv[0] == b'mitogen:alice@box:123'


def test_getpid_is_the_child(master):
    assert master.call('os', 'getpid') == master.pid


def test_globals_and_descriptors(spawn, tmp_path):
    # Evaluate inside the child through a helper module.
    helper = tmp_path / 'agent_probe.py'
    helper.write_text(
        'import os, sys, mitogen, mitogen.core\n'
        'def probe():\n'
        '    return {"executable": sys.executable, "argv": sys.argv,\n'
        '            "context_id": mitogen.context_id,\n'
        '            "parent_id": mitogen.parent_id,\n'
        '            "parent_ids": mitogen.parent_ids,\n'
        '            "core_context_id": mitogen.core.context_id,\n'
        '            "stdin": os.readlink("/proc/self/fd/0")}\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    m = spawn(context_id=7, name='bob', env=env)
    info = m.call('agent_probe', 'probe')
    assert info['executable'] == os.path.realpath(fm.PYTHON)
    assert info['argv'] == ['mitogen:bob']
    assert info['context_id'] == info['core_context_id'] == 7
    assert info['parent_id'] == 0 and info['parent_ids'] == [0]
    assert info['stdin'] == '/dev/null'


def test_user_code_gets_the_real_functools(master):
    # The agent imports _pickle with a functools stand-in; it must not leak.
    assert master.call('agent_testmod', 'real_functools') == (2, 5, True)


def test_protocol_not_inherited_by_subprocesses(master):
    # A subprocess sees only fds 0-2 (plus its own listdir fd).
    out = master.call('subprocess', 'check_output',
                      ['ls', '/proc/self/fd'])
    fds = sorted(int(x) for x in out.split())
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4


def test_pipes_instead_of_socketpair(spawn):
    m = spawn(use_pipes=True)
    assert m.call('os', 'getpid') == m.pid
    m.shutdown()
    assert m.wait() == 0


def test_calls_sent_before_mito001(spawn):
    payload = fm.encode((None, 'os', None, 'getpid', (), fm.Kwargs()))
    early = fm.HEADER.pack(fm.MAGIC, 1, 0, 0, fm.CALL_FUNCTION, 1500,
                           len(payload)) + payload
    m = spawn(early_frames=early * 2)
    first, second = m.recv(), m.recv()
    assert first.handle == second.handle == 1500
    assert m.result(first) == m.result(second) == m.pid


def test_stdin_closed_during_stage1():
    source = fm.stage1_source(len(fm.compressed_agent()))
    proc = subprocess.Popen(['mitogen:early', '-c', source],
                            executable=fm.PYTHON, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(b'xx', timeout=5)
    assert out == b'MITO000\n'
    assert proc.returncode != 0
    assert b'stdin closed' in err


def test_stdin_closed_before_config_frame():
    preamble = fm.compressed_agent()
    source = fm.stage1_source(len(preamble))
    proc = subprocess.Popen(['mitogen:early', '-c', source],
                            executable=fm.PYTHON, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(preamble + b'MI\0\0', timeout=5)
    assert out == b'MITO000\n'
    assert proc.returncode != 0
    assert b'BOOTSTRAP' in err


# -- calls -------------------------------------------------------------------

def test_args_and_kwargs(master):
    assert master.call('builtins', 'max', 3, 9, 2) == 9
    assert master.call('builtins', 'max', [], default=5) == 5
    assert master.call('operator', 'add', 2, 40) == 42
    d = {'a': [1, 2], 'b': None}
    assert master.call('copy', 'copy', d) == d
    assert master.call('agent_testmod', 'add', 1, 2, scale=10) == 30


def test_class_name(master):
    assert master.call('agent_testmod', 'triple', 5, _class='Thing') == 15
    assert master.call('builtins', 'fromkeys', ['a'], 0,
                       _class='dict') == {'a': 0}


def test_exception_becomes_call_error(master):
    with pytest.raises(RemoteError) as info:
        master.call('agent_testmod', 'nested_fail')
    text = info.value.args[0]
    first, rest = text.split('\n', 1)
    assert first == 'builtins.ValueError: deep down'
    assert 'agent_testmod.py' in rest
    assert 'in nested_fail' in rest and 'in fail' in rest
    assert "raise ValueError(message)" in rest
    # The context keeps serving.
    assert master.call('agent_testmod', 'echo', 'still here') == 'still here'


def test_missing_module(master):
    with pytest.raises(RemoteError) as info:
        master.call('no_such_module_xyz', 'f')
    assert info.value.args[0].startswith(
        "builtins.ModuleNotFoundError: No module named 'no_such_module_xyz'")


def test_missing_function(master):
    with pytest.raises(RemoteError) as info:
        master.call('os', 'no_such_function')
    assert info.value.args[0].startswith('builtins.AttributeError:')
    assert 'no_such_function' in info.value.args[0]


def test_sys_exit_in_call_is_an_error_not_an_exit(master):
    with pytest.raises(RemoteError) as info:
        master.call('agent_testmod', 'exit_now')
    assert info.value.args[0].startswith('builtins.SystemExit: 3')
    assert master.call('os', 'getpid') == master.pid


@pytest.mark.parametrize('function,typename', [
    ('return_set', 'set'),
    ('return_function', 'function'),
    ('return_object', 'object'),
])
def test_unsendable_return_value(master, function, typename):
    with pytest.raises(RemoteError) as info:
        master.call('agent_testmod', function)
    first = info.value.args[0].split('\n')[0]
    assert first.startswith('mitogen.core.StreamError: cannot send')
    assert repr(typename) in first
    assert master.call('agent_testmod', 'echo', 1) == 1


def test_too_deeply_nested_return_value(master):
    assert master.call('agent_testmod', 'deep', 50) is not None
    with pytest.raises(RemoteError) as info:
        master.call('agent_testmod', 'deep', 150)
    assert 'nested deeper' in info.value.args[0]


VALUES = [
    None, True, False, 0, -1, 255, 65536, -2 ** 31, 2 ** 31, 2 ** 100,
    -(10 ** 40), 1.5, float('inf'), b'', b'\x00\xffbytes', bytearray(),
    bytearray(b'ba\x00'), '', 'unicode \u20ac \U0001F600', [], (), {},
    [1, [2, (3, {'k': [b'v']})]], (1,), {'a': 1, 2: 'b', (1, 2): None},
    {'big': b'x' * 100000},
]


# protocol.md: opcodes the C++ decoder accepts.
CXX_OPCODES = set("""
    PROTO STOP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG1 LONG4
    BINFLOAT BINUNICODE SHORT_BINUNICODE BINUNICODE8 SHORT_BINBYTES BINBYTES
    BINBYTES8 BYTEARRAY8 EMPTY_LIST APPEND APPENDS EMPTY_TUPLE TUPLE1 TUPLE2
    TUPLE3 TUPLE MARK EMPTY_DICT SETITEM SETITEMS BINPUT LONG_BINPUT MEMOIZE
    BINGET LONG_BINGET GLOBAL STACK_GLOBAL REDUCE FRAME POP POP_MARK DUP
""".split())


def assert_cxx_decodable(data):
    import pickletools
    used = set(op.name for op, arg, pos in pickletools.genops(data))
    assert used <= CXX_OPCODES, used - CXX_OPCODES


@pytest.mark.parametrize('protocol', [2, 3])
def test_round_trip(master, protocol):
    for value in VALUES:
        payload = fm.encode((None, 'agent_testmod', None, 'echo', (value,),
                             fm.Kwargs()), protocol)
        msg = master.call_raw(payload)
        assert_cxx_decodable(msg.data)
        got = master.result(msg)
        assert got == value and type(got) is type(value), value


def test_error_replies_are_cxx_decodable(master):
    for module, function in [('agent_testmod', 'fail'),
                             ('agent_testmod', 'return_set')]:
        msg = master.call_raw(master.call_payload(module, function, ('x',)
                                                  if function == 'fail'
                                                  else ()))
        assert_cxx_decodable(msg.data)
        assert b'mitogen.core\n_unpickle_call_error' in msg.data


def test_wire_classes_round_trip(master):
    got = master.call('agent_testmod', 'echo',
                      [fm.Blob(b'abc'), fm.Secret('pw'), fm.Kwargs(a=1),
                       fm.Context(3, 'ctx')])
    assert type(got[0]) is fm.Blob and got[0] == b'abc'
    assert type(got[1]) is fm.Secret and got[1] == 'pw'
    assert type(got[2]) is fm.Kwargs and got[2] == {'a': 1}
    assert type(got[3]) is fm.Context
    assert (got[3].context_id, got[3].name) == (3, 'ctx')


def test_dead_marker_round_trip(master):
    # GLOBAL mitogen.core _DEAD + EMPTY_TUPLE + REDUCE, in both directions.
    payload = (b'\x80\x02(NX\r\x00\x00\x00agent_testmodNX\x04\x00\x00\x00echo'
               b'cmitogen.core\n_DEAD\n)R\x85}t.')
    msg = master.call_raw(payload)
    assert b'cmitogen.core\n_DEAD\n' in msg.data and b')R' in msg.data
    assert type(master.result(msg)) is fm.DEAD


def test_agent_writes_protocol_3_bytes(master):
    # protocol.md "Deviation": bytes go out as BINBYTES, not _codecs.encode.
    msg = master.call_raw(master.call_payload('agent_testmod', 'echo',
                                              (b'abc',)))
    assert msg.data.startswith(b'\x80\x03')
    assert b'_codecs' not in msg.data and b'C\x03abc' in msg.data


def test_large_payloads(master):
    big = os.urandom(3 * 1024 * 1024)
    assert master.call('agent_testmod', 'echo', big) == big
    value = [big, big[:10]]
    assert master.call('agent_testmod', 'echo', value) == value


def test_call_no_reply_sends_nothing(master):
    master.call_no_reply('agent_testmod', 'echo', 'ignored')
    master.call_no_reply('agent_testmod', 'fail', 'quietly')
    # The very next non-log frame is the reply to the following call.
    assert master.call('os', 'getpid') == master.pid
    # The failure was logged (and forwarded).
    name, level, text = master.wait_for_log(lambda r: 'quietly' in r[2])
    assert name == 'mitogen' and level == 40
    assert 'agent_testmod.fail()' in text


def test_chain(master):
    master.call_no_reply('agent_testmod', 'fail', 'first', _chain='c1')
    with pytest.raises(RemoteError) as info:
        master.call('agent_testmod', 'echo', 1, _chain='c1')
    assert 'builtins.ValueError: first' in info.value.args[0]
    # Other chains and unchained calls are unaffected.
    assert master.call('agent_testmod', 'echo', 2, _chain='c2') == 2
    assert master.call('agent_testmod', 'echo', 3) == 3
    # Upstream's forget_chain clears it.
    master.call('mitogen.core', 'forget_chain', 'c1', _class='Dispatcher')
    assert master.call('agent_testmod', 'echo', 4, _chain='c1') == 4


# -- leader/follower reading --------------------------------------------------

def _recv_request(m, handle):
    msg = m.recv(handle=handle)
    assert msg.handle == handle and msg.reply_to >= 1000, msg
    return msg


def test_reply_while_main_thread_waits_and_calls_queue_behind(master):
    h1 = master.new_handle()
    master.send(fm.CALL_FUNCTION,
                master.call_payload('agent_testmod', 'request_parent',
                                    (5000, 'q1')), reply_to=h1)
    request = _recv_request(master, 5000)
    assert request.data == b'q1'
    # A call arrives before the reply: it must wait for the running call.
    h2 = master.new_handle()
    master.send(fm.CALL_FUNCTION, master.call_payload('os', 'getpid'),
                reply_to=h2)
    master.send(request.reply_to, b'answer1')
    first, second = master.recv(), master.recv()
    assert first.handle == h1 and master.result(first)[0] == b'answer1'
    assert second.handle == h2 and master.result(second) == master.pid


def test_reply_to_a_user_thread_while_main_idle(master):
    master.call('agent_testmod', 'request_in_thread', 5000, 'q2')
    request = _recv_request(master, 5000)
    master.send(request.reply_to, b'answer2')
    assert master.call('agent_testmod', 'thread_result', 'q2')[0] == b'answer2'


def test_user_thread_reads_while_main_busy(master):
    master.call('agent_testmod', 'request_in_thread', 5000, 'q3')
    request = _recv_request(master, 5000)
    h_sleep, h_pid = master.new_handle(), master.new_handle()
    master.send(fm.CALL_FUNCTION,
                master.call_payload('agent_testmod', 'timed_sleep', (0.5,)),
                reply_to=h_sleep)
    time.sleep(0.1)   # main thread is now sleeping; the user thread reads
    master.send(fm.CALL_FUNCTION, master.call_payload('os', 'getpid'),
                reply_to=h_pid)
    master.send(request.reply_to, b'answer3')
    slept, pid = master.recv(), master.recv()
    assert slept.handle == h_sleep and pid.handle == h_pid
    assert master.result(pid) == master.pid
    data, when = master.call('agent_testmod', 'thread_result', 'q3')
    assert data == b'answer3'
    assert when < master.result(slept)   # got its reply during the sleep


def test_reply_to_closed_handle_gets_dead_reply(master):
    master.call('agent_testmod', 'request_in_thread', 5000, 'q4')
    request = _recv_request(master, 5000)
    master.send(request.reply_to, b'answer4')
    master.call('agent_testmod', 'thread_result', 'q4')
    # The slot is closed now: a second reply is refused.
    master.send(request.reply_to, b'late', reply_to=1777)
    msg = master.recv()
    assert msg.handle == 1777 and msg.reply_to == fm.IS_DEAD


# -- refusals ----------------------------------------------------------------

def test_each_call_payload_is_decoded_on_its_own(master):
    """The agent reuses one unpickler for calls (_serve): nothing of a
    payload may show through in the next one: not its memo (a payload made of
    one BINGET would otherwise replay an earlier call), not bytes after its
    STOP, not what a failed decode left behind."""
    first = pickle.dumps((None, 'os', None, 'getpid', (), {}), 2)
    assert master.result(master.call_raw(first)) == master.pid
    for index in range(8):
        replay = b'\x80\x02h' + bytes([index]) + b'.'     # BINGET index; STOP
        with pytest.raises(RemoteError) as info:
            master.result(master.call_raw(replay))
        assert 'StreamError' in info.value.args[0] or 'Memo' in info.value.args[0], info.value
    # Bytes after STOP: ignored for this call, never decoded as the next one.
    trailing = first + pickle.dumps((None, 'os', None, 'getcwd', (), {}), 2)
    assert master.result(master.call_raw(trailing)) == master.pid
    assert master.result(master.call_raw(first)) == master.pid
    # A payload cut short fails, and the next one decodes cleanly.
    with pytest.raises(RemoteError):
        master.result(master.call_raw(first[:-6]))
    assert master.result(master.call_raw(first)) == master.pid


def test_forbidden_global_in_call_is_refused(master):
    # A hostile CALL_FUNCTION: os.system as an argument.
    payload = pickle.dumps((None, 'os', None, 'getpid', (os.system,), {}), 2)
    assert b'system' in payload
    with pytest.raises(RemoteError) as info:
        master.result(master.call_raw(payload))
    assert info.value.args[0].startswith(
        'mitogen.core.StreamError: refused to unpickle posix.system')
    # A hostile bytearray size: (None, 'os', None, 'getpid',
    # (bytearray(0x7f000000),), {}) must not allocate 2 GB.
    evil = (b'\x80\x02(NX\x02\x00\x00\x00osNX\x06\x00\x00\x00getpid'
            b'c__builtin__\nbytearray\nJ\x00\x00\x00\x7f\x85R\x85}t.')
    with pytest.raises(RemoteError) as info:
        master.result(master.call_raw(evil))
    assert 'cannot unpickle bytearray' in info.value.args[0]
    assert master.call('os', 'getpid') == master.pid


def test_truncated_payload_is_refused(master):
    payload = master.call_payload('os', 'getpid')[:-3]
    with pytest.raises(RemoteError) as info:
        master.result(master.call_raw(payload))
    text = info.value.args[0]
    assert 'Ran out of input' in text or 'truncated' in text
    assert master.call('os', 'getpid') == master.pid


def test_unknown_handle_with_reply_to_gets_dead_reply(master):
    master.send(4242, b'', reply_to=1500)
    msg = master.recv()
    assert msg.handle == 1500 and msg.reply_to == fm.IS_DEAD
    assert b'4242' in msg.data
    assert master.call('os', 'getpid') == master.pid


def test_unknown_handle_without_reply_to_is_dropped_and_logged(master):
    master.send(4243, b'whatever')
    assert master.call('os', 'getpid') == master.pid
    name, level, text = master.wait_for_log(lambda r: '4243' in r[2])
    assert name == 'mitogen' and level == 30


def test_bad_magic_makes_agent_exit(master):
    master.send(fm.CALL_FUNCTION, b'', magic=0x1234)
    name, level, text = master.wait_for_log(lambda r: 'magic' in r[2])
    assert level == 40
    assert master.wait() == 1


def test_oversized_frame_makes_agent_exit(spawn):
    m = spawn(max_message_size=1000)
    m.write(fm.HEADER.pack(fm.MAGIC, 1, 0, 0, fm.CALL_FUNCTION, 0, 1001))
    m.wait_for_log(lambda r: 'max_message_size' in r[2])
    assert m.wait() == 1


def test_reply_larger_than_max_message_size(spawn):
    m = spawn(max_message_size=1000)
    with pytest.raises(RemoteError) as info:
        m.call('builtins', 'bytes', 2000)
    assert 'exceeds max_message_size' in info.value.args[0]


# -- output and logging ------------------------------------------------------

def test_print_is_forwarded(master):
    master.call('builtins', 'print', 'hello', 'world')
    assert master.wait_for_log(lambda r: r[0] == 'stdout') == \
        ('stdout', 20, 'hello world')


def test_stderr_and_subprocess_output_forwarded(master):
    master.call('agent_testmod', 'say', 'to stderr\n', 'stderr')
    assert master.wait_for_log(lambda r: r[0] == 'stderr') == \
        ('stderr', 20, 'to stderr')
    master.call('os', 'system', 'echo from a subprocess')
    assert master.wait_for_log(lambda r: 'subprocess' in r[2]) == \
        ('stdout', 20, 'from a subprocess')


def test_logging_is_forwarded(master):
    # The first import of logging happens inside this very call.
    assert '_LoggingImportHook' in master.call('agent_testmod', 'meta_path')
    master.call('agent_testmod', 'log', 'hello from logging', 30)
    assert master.wait_for_log(lambda r: 'hello from logging' in r[2]) == \
        ('agent_testmod', 30, 'hello from logging')
    master.call('agent_testmod', 'log', 'below the level', 10)
    master.call('agent_testmod', 'log', 'info level', 20, 'other')
    assert master.wait_for_log(lambda r: 'info level' in r[2]) == \
        ('other', 20, 'info level')
    assert not any('below the level' in r[2] for r in master.logs)
    # The import hook removed itself once logging was loaded.
    assert '_LoggingImportHook' not in master.call('agent_testmod',
                                                   'meta_path')


def test_logging_imported_before_bootstrap(spawn, tmp_path):
    # Here `logging` is already loaded when the agent starts (site imports
    # it), so the handler is installed at bootstrap instead of by the hook.
    (tmp_path / 'sitecustomize.py').write_text('import logging\n')
    m = spawn()   # tmp_path is on its PYTHONPATH
    assert '_LoggingImportHook' not in m.call('agent_testmod', 'meta_path')
    m.call('agent_testmod', 'log', 'early logging', 30)
    assert m.wait_for_log(lambda r: 'early logging' in r[2])[1] == 30


def test_logging_exception_includes_traceback(master):
    master.call('agent_testmod', 'log_exception')
    name, level, text = master.wait_for_log(lambda r: 'it broke' in r[2])
    assert level == 40 and 'ZeroDivisionError' in text


def test_log_level_debug(spawn):
    m = spawn(log_level=10)
    m.call('agent_testmod', 'log', 'debug record', 10)
    assert m.wait_for_log(lambda r: 'debug record' in r[2])[1] == 10


def test_debug_log_file(spawn):
    m = spawn(debug=True)
    m.call('os', 'getpid')
    path = '/tmp/mitogen-%d/mitogen.%d.log' % (os.geteuid(), m.pid)
    try:
        with open(path) as f:
            text = f.read()
        assert 'bootstrap' in text and 'handle=101' in text
    finally:
        os.unlink(path)


# -- lifetime ----------------------------------------------------------------

def test_shutdown_exits_zero_and_flushes_output(master):
    master.call('agent_testmod', 'say', 'no newline yet')
    master.shutdown()
    assert master.wait() == 0
    assert ('stdout', 20, 'no newline yet') in _drain_logs(master)


def _drain_logs(m):
    """Read until the agent closes the connection; return all log records."""
    try:
        while True:
            m.recv(timeout=30)   # ends at EOF; the bound is for a hang
    except EOFError:
        return m.logs


@pytest.mark.parametrize('use_pipes', [False, True])
def test_master_close_while_idle(spawn, use_pipes):
    m = spawn(use_pipes=use_pipes)
    m.call('os', 'getpid')
    m.close()
    assert _gone_within(m, 30)   # exits on EOF (a bound for a hang, not a speed)


@pytest.mark.parametrize('use_pipes', [False, True])
def test_master_close_during_long_call(spawn, use_pipes, tmp_path):
    m = spawn(use_pipes=use_pipes)
    fifo = str(tmp_path / 'hold')
    os.mkfifo(fifo)
    m.send(fm.CALL_FUNCTION, m.call_payload('agent_testmod', 'hold', (fifo,)),
           reply_to=m.new_handle())
    fd = None
    deadline = time.monotonic() + 30
    while fd is None:   # answer its GET_MODULE until it is inside the call
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            assert e.errno == errno.ENXIO and time.monotonic() < deadline
            with pytest.raises(TimeoutError):
                m.recv(timeout=0.05)
    try:
        assert m.proc.poll() is None   # really busy, in a call that never ends
        m.close()
        assert _gone_within(m, 30)     # a bound for a hang, not a speed
    finally:
        os.close(fd)


def test_master_killed_leaves_no_orphan(testmod_env, tmp_path):
    # A real master process that dies abruptly: its agent must follow.
    script = tmp_path / 'parent.py'
    script.write_text(
        'import sys, os\n'
        'sys.path.insert(0, %r)\n'
        'import fake_master\n'
        'm = fake_master.FakeMaster(env=dict(os.environ))\n'
        'm.send(fake_master.CALL_FUNCTION,\n'
        '       m.call_payload("time", "sleep", (30,)), reply_to=1001)\n'
        'print(m.pid, flush=True)\n'
        'os._exit(0)\n' % os.path.dirname(fm.__file__))
    out = subprocess.check_output([fm.PYTHON, str(script)], env=testmod_env,
                                  timeout=10)
    pid = int(out)
    deadline = time.monotonic() + 30   # a bound for a hang, not a speed
    while time.monotonic() < deadline:
        if not _alive(pid):
            break
        time.sleep(0.02)
    assert not _alive(pid)


def _alive(pid):
    # The orphan is reparented to init (or a subreaper), which reaps it; a
    # zombie counts as gone.
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().split(') ')[1][0] != 'Z'
    except FileNotFoundError:
        return False


def test_shutdown_while_other_calls_queued(master):
    master.call_no_reply('time', 'sleep', 0.2)
    master.shutdown()
    assert master.wait() == 0
