"""Child output and logs reach Python's logging."""
import logging
import os
import re
import time

import pytest

import remote_helpers


def _wait_for(caplog, predicate, within=30.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for record in caplog.records:
            if predicate(record):
                return record
        time.sleep(0.02)
    return None


def test_child_stdout_and_logging_reach_mitogen_ctx_logger(router, caplog):
    caplog.set_level(logging.INFO)
    ctx = router.local(remote_name='talker')
    ctx.call(remote_helpers.say, 'hello from the child')
    ctx.call(remote_helpers.warn, 'careful')
    out = _wait_for(caplog, lambda r: 'hello from the child' in r.getMessage())
    assert out is not None
    assert out.name == 'mitogen.ctx.talker' and out.levelno == logging.INFO
    assert out.getMessage() == 'stdout: hello from the child'
    assert out.mitogen_name == 'stdout' and out.mitogen_context_name == 'talker'
    warned = _wait_for(caplog, lambda r: 'careful' in r.getMessage())
    assert warned is not None and warned.levelno == logging.WARNING
    assert warned.getMessage() == 'remote_helpers: careful'


def test_call_no_reply_failure_is_logged(router, caplog):
    caplog.set_level(logging.INFO)
    ctx = router.local(remote_name='failing')
    ctx.call_no_reply(remote_helpers.raise_value_error, 'nobody waits')
    rec = _wait_for(caplog, lambda r: 'nobody waits' in r.getMessage())
    assert rec is not None and rec.name == 'mitogen.ctx.failing' and rec.levelno >= logging.ERROR


def test_log_to_file_path(tmp_path):
    from helpers import run_script
    path = tmp_path / 'log.txt'
    proc = run_script('''if 1:
        import mitogen_native.utils, remote_helpers
        mitogen_native.utils.log_to_file(%r, level='INFO')
        def main(router):
            router.local(remote_name='filelog').call(remote_helpers.say, 'to the file')
        mitogen_native.utils.run_with_router(main)
    ''' % str(path))
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    assert 'mitogen.ctx.filelog: stdout: to the file' in text


def test_each_local_context_has_its_own_name_and_logger(router, caplog):
    import getpass
    import os
    import socket
    caplog.set_level(logging.INFO)
    a, b = router.local(), router.local()
    pa, pb = a.call(os.getpid), b.call(os.getpid)
    # Upstream's names: local.<child pid>; the argv title keeps <user>@<host>:<our pid>.
    assert (a.name, b.name) == ('local.%d' % pa, 'local.%d' % pb)
    title = 'mitogen:%s@%s:%d' % (getpass.getuser(), socket.gethostname(), os.getpid())
    assert a.call(remote_helpers.cmdline).split(b'\0')[0].decode() == title
    a.call(remote_helpers.say, 'from a')
    b.call(remote_helpers.say, 'from b')
    ra = _wait_for(caplog, lambda r: r.getMessage() == 'stdout: from a')
    rb = _wait_for(caplog, lambda r: r.getMessage() == 'stdout: from b')
    assert ra.name == 'mitogen.ctx.local.%d' % pa and ra.mitogen_context_name == a.name
    assert rb.name == 'mitogen.ctx.local.%d' % pb
    # remote_name still names the context as well as its argv title.
    assert router.local(remote_name='named').name == 'named'


# -- a failed start keeps its reason, said once (issue 13 §9) ----------------

def test_failed_start_gives_exit_status_and_stderr(router):
    import mitogen_native.core
    with pytest.raises(mitogen_native.core.StreamError) as e:
        router.local(python_path='/bin/false')
    assert 'exited with status 1' in str(e.value)
    with pytest.raises(mitogen_native.core.StreamError) as e:
        router.local(python_path=['/bin/sh', '-c', 'echo oops-4711 >&2; exit 3'])
    assert 'exited with status 3' in str(e.value) and 'oops-4711' in str(e.value)


def test_failed_start_stderr_is_not_printed_without_logging():
    from helpers import run_script
    proc = run_script('''if 1:
        import mitogen_native.master, mitogen_native.core
        with mitogen_native.master.Router() as router:
            try:
                router.local(python_path=['/bin/sh', '-c', 'echo oops-4711 >&2; exit 3'])
            except mitogen_native.core.StreamError as e:
                print('raised', 'oops-4711' in str(e))
    ''')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == 'raised True'
    assert 'oops-4711' not in proc.stderr


def test_boot_stderr_of_a_successful_start_is_logged_once(router, caplog):
    import sys
    caplog.set_level(logging.DEBUG, logger='mitogen')
    ctx = router.local(python_path=[
        '/bin/sh', '-c', 'echo said-at-boot-4711 >&2; exec "$0" "$@"', sys.executable])
    ctx.call(remote_helpers.say, 'after boot')   # the log pump has moved on
    assert _wait_for(caplog, lambda r: 'after boot' in r.getMessage())
    said = [r for r in caplog.records if 'said-at-boot-4711' in r.getMessage()
            and r.levelno >= logging.WARNING]
    assert len(said) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason='su to another user needs root')
def test_su_to_a_nologin_account_via_a_context_says_why(router):
    import pwd
    import mitogen_native.core
    try:
        shell = pwd.getpwnam('nobody').pw_shell
    except KeyError:
        pytest.skip('no user nobody')
    if 'nologin' not in shell:
        pytest.skip('nobody has a login shell here')
    direct = via = None
    with pytest.raises(mitogen_native.core.StreamError) as direct:
        router.su(username='nobody', connect_timeout=20)
    with pytest.raises(mitogen_native.core.StreamError) as via:
        router.su(username='nobody', via=router.local(), connect_timeout=20)
    for e in (direct, via):
        assert 'currently not available' in str(e.value)


def test_log_lines_do_not_repeat_the_prefix(router, caplog):
    import mitogen_native.core
    caplog.set_level(logging.INFO)
    ctx = router.local(max_message_size=65536)
    with pytest.raises(mitogen_native.core.ChannelError):
        ctx.call(remote_helpers.identity, 'x' * 100000)
    rec = _wait_for(caplog, lambda r: 'max_message_size' in r.getMessage())
    assert rec is not None
    # The frame's size depends on how the call is encoded; the text around it not.
    m = re.fullmatch(r'mitogen: frame of (\d+) bytes exceeds max_message_size 65536: exiting',
                     rec.getMessage())
    assert m and int(m.group(1)) > 100000, rec.getMessage()
    # The core's own records (logger 'mitogen') do not start with it either.
    assert not any('mitogen: mitogen:' in '%s: %s' % (r.name, r.getMessage())
                   for r in caplog.records)


def test_enable_debug_log_holds_the_core_debug_messages(tmp_path):
    from helpers import run_script
    proc = run_script('''if 1:
        import os, mitogen_native.master, mitogen_native.core, remote_helpers
        with mitogen_native.master.Router() as router:
            router.enable_debug()
            ctx = router.local()
            ctx.call(remote_helpers.add, 1, 2)
            ctx.shutdown(wait=True, timeout=30)
        print(mitogen_native.core.debug_log_path())
    ''', env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    with open(proc.stdout.strip()) as f:
        text = f.read()
    for expected in ('starting context 1', 'booted in', 'call remote_helpers.add() in context 1',
                     'disconnected'):
        assert expected in text, (expected, text)
    assert 'mitogen: mitogen:' not in text


# -- output is not lost (issue 13 §4) ----------------------------------------

def _lines_from(caplog, context_name, logger='stdout'):
    out = []
    for r in caplog.records:
        if getattr(r, 'mitogen_context_name', None) == context_name and r.mitogen_name == logger:
            out.extend(r.mitogen_message.split('\n'))
    return out


def _wait_lines(caplog, context_name, n, within=120.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        lines = _lines_from(caplog, context_name)
        if len(lines) >= n:
            return lines
        time.sleep(0.05)
    return _lines_from(caplog, context_name)


def test_every_printed_line_arrives_in_few_records(router, caplog):
    caplog.set_level(logging.INFO)
    ctx = router.local()
    assert ctx.call(remote_helpers.print_lines, 50000) == 50000
    lines = _wait_lines(caplog, ctx.name, 50000)
    assert lines == ['line %d' % i for i in range(50000)]
    records = [r for r in caplog.records if getattr(r, 'mitogen_context_name', None) == ctx.name]
    assert len(records) < 25000   # coalesced: several lines per record
    assert not any('dropp' in r.getMessage() for r in caplog.records)


def test_output_beyond_the_budget_waits_instead_of_being_dropped(router, caplog):
    # 24 MiB of output: more than the agent's burst (16 MiB), so the writer is
    # held back until the budget refills; nothing is lost.
    caplog.set_level(logging.INFO)
    ctx = router.local()
    n = 24 * 1024 * 1024 // 128
    assert ctx.call(remote_helpers.print_lines, n, 127) == n
    lines = _wait_lines(caplog, ctx.name, n)
    assert len(lines) == n and lines[-1].rstrip() == 'line %d' % (n - 1)
    ctx.shutdown(wait=True, timeout=30)
    assert not any('dropp' in r.getMessage() for r in caplog.records)


def test_a_child_ignoring_the_budget_is_cut_to_it_and_told(router, caplog):
    caplog.set_level(logging.INFO)
    ctx = router.local()
    n = 50000
    assert ctx.call(remote_helpers.flood_log_records, n) == n
    assert ctx.call(remote_helpers.add, 1, 2) == 3        # the master is fine
    ctx.shutdown(wait=True, timeout=30)
    report = _wait_for(caplog, lambda r: 'log records (' in r.getMessage() and 'dropped' in r.getMessage())
    assert report is not None and report.name == 'mitogen'
    import re
    dropped = int(re.search(r'dropped (\d+) log records', report.getMessage()).group(1))
    got = [r for r in caplog.records if getattr(r, 'mitogen_name', None) == 'flood']
    assert dropped > 0 and len(got) + dropped == n
