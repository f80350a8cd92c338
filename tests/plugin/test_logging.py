"""Child output and logs reach Python's logging."""
import logging
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
    from conftest import run_script
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
