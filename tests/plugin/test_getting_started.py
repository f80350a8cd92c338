"""Every code example of the Getting Started chapter, with `mitogen` spelled
`mitogen_native`, exactly as the chapter writes it."""
import getpass
import os
import socket

import mitogen_native.master
import mitogen_native.utils

from helpers import pid_alive, run_script
import remote_helpers


def test_broker_and_router():
    broker = mitogen_native.master.Broker()
    router = mitogen_native.master.Router(broker)

    try:
        # Your code here.
        pass
    finally:
        broker.shutdown()

    broker.join()
    assert broker.shutting_down
    assert router.broker is broker


def test_run_with_router():
    seen = []

    def do_mitogen_stuff(router):
        # Your code here.
        seen.append(router)

    mitogen_native.utils.run_with_router(do_mitogen_stuff)
    assert isinstance(seen[0], mitogen_native.master.Router)
    assert seen[0].broker.shutting_down


def test_log_to_file(capfd):
    import logging
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        # Errors, warnings, and child stdio will be written to stderr.
        mitogen_native.utils.log_to_file()
        logging.getLogger('mitogen').warning('visible on stderr')
        assert 'visible on stderr' in capfd.readouterr().err
    finally:
        root.handlers[:], root.level = saved


def test_creating_a_context(router):
    local = router.local()
    local_with_name = router.local(remote_name='i-have-a-name')

    # Both are subprocesses of this interpreter, named in argv[0].
    default = 'mitogen:%s@%s:%d' % (getpass.getuser(), socket.gethostname(), os.getpid())
    for ctx, argv0 in ((local, default), (local_with_name, 'mitogen:i-have-a-name')):
        pid = ctx.call(os.getpid)
        with open('/proc/%d/stat' % pid) as f:
            ppid = int(f.read().rsplit(')', 1)[1].split()[1])
        assert ppid == os.getpid()
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            assert f.read().split(b'\0')[0] == argv0.encode()
        assert ctx.call(remote_helpers.cmdline).split(b'\0')[0] == argv0.encode()
    assert local_with_name.name == 'i-have-a-name'


def test_enable_debug_example():
    # In a fresh process: enable_debug() changes process-wide logging.
    proc = run_script('''if 1:
        import os, mitogen_native.master
        broker = mitogen_native.master.Broker()
        router = mitogen_native.master.Router(broker)
        router.enable_debug()
        ctx = router.local()
        print(ctx.call(os.getpid), os.getpid())
        broker.shutdown()
        broker.join()
    ''')
    assert proc.returncode == 0, proc.stderr
    child, parent = map(int, proc.stdout.split())
    import mitogen_native.core
    for pid in (child, parent):
        path = mitogen_native.core.debug_log_path(pid)
        assert path == '/tmp/mitogen-%d/mitogen.%d.log' % (os.geteuid(), pid)
        assert os.path.getsize(path) > 0
        assert os.stat(path).st_mode & 0o077 == 0
        os.unlink(path)


def test_contexts_gone_after_shutdown():
    broker = mitogen_native.master.Broker()
    router = mitogen_native.master.Router(broker)
    pids = [router.local().call(os.getpid) for _ in range(2)]
    broker.shutdown()
    broker.join()
    assert not any(pid_alive(p) for p in pids)
