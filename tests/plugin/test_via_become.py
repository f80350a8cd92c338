"""sudo/su/doas started by another context (via=): the intermediary's agent runs
the program under a terminal of its own and answers the prompt
(core/agent/via/30_become.py, _spawn_sudo; docs/become.md, docs/via.md).

Against the loopback sshd (tests/core/context/ssh/sshd_fixture.py) and the users and
sudoers rule of tests/core/context/become/become_fixture.py: `mitogen-test` may sudo to
anyone, with its password."""
import os
import signal
import subprocess
import sys
import time

import pytest

import mitogen_native.core
import mitogen_native.master

import via_helpers

from servers import CAN_RUN_SSHD, SSHD_FIXTURE, ssh_kwargs

pytestmark = pytest.mark.skipif(
    not CAN_RUN_SSHD, reason='needs root and openssh-server for a loopback sshd and test users')


def ssh_as_test_user(router, sshd):
    return router.ssh(**ssh_kwargs(sshd))


def test_ssh_then_sudo_then_call(router, sshd, become_users):
    s = ssh_as_test_user(router, sshd)
    assert s.call(os.getuid) != 0
    root = router.sudo(via=s, password=sshd['password'], connect_timeout=20)
    assert root.call(os.getuid) == 0
    assert root.name.startswith(s.name + '.sudo.root')
    # The password is on no command line between the ssh session and the agent.
    pid = root.call(os.getpid)
    assert not root.call(via_helpers.cmdline_contains_upwards, pid, sshd['password'])


def test_three_levels_ssh_sudo_local(router, sshd, become_users):
    s = ssh_as_test_user(router, sshd)
    root = router.sudo(via=s, password=sshd['password'], connect_timeout=20)
    leaf = router.local(via=root)
    assert leaf.call(os.getuid) == 0
    assert leaf.call(os.getppid) == root.call(os.getpid)
    # The leaf's messages travel leaf -> sudo context -> ssh context -> us.
    assert leaf.call(sum, [1, 2, 3]) == 6


def test_wrong_password_through_ssh_is_a_password_error(router, sshd, become_users):
    s = ssh_as_test_user(router, sshd)
    t0 = time.monotonic()
    with pytest.raises(mitogen_native.core.PasswordError, match='incorrect'):
        router.sudo(via=s, password='not-the-password-5678', connect_timeout=20)
    assert time.monotonic() - t0 < 15
    with pytest.raises(mitogen_native.core.PasswordError, match='required'):
        router.sudo(via=s, connect_timeout=20)
    assert s.call(os.getuid) != 0   # the ssh context is unharmed


def test_not_allowed_and_timeout_via_a_local_context(router, become_users):
    a = router.local()
    with pytest.raises(mitogen_native.core.StreamError, match='may not become'):
        router.sudo(via=a, sudo_path=become_users['sudo_as_nosudo'],
                    password=become_users['nosudo_password'], connect_timeout=20)
    t0 = time.monotonic()
    with pytest.raises(mitogen_native.core.StreamError, match='connect timeout'):
        router.sudo(via=a, sudo_path=become_users['sudo_hang'], connect_timeout=2)
    assert time.monotonic() - t0 < 8


def test_su_via_a_local_context(router, become_users):
    a = router.local()
    ctx = router.su(via=a, username=become_users['test_user'], su_path=become_users['su_as_nosudo'],
                    password=become_users['test_password'], connect_timeout=30)
    assert ctx.call(os.getuid) == become_users['test_uid']


def test_cutting_the_ssh_connection_fails_calls_below_it_at_once(router, sshd, become_users):
    s = ssh_as_test_user(router, sshd)
    root = router.sudo(via=s, password=sshd['password'], connect_timeout=20)
    leaf = router.local(via=root)
    pending = [c.call_async(time.sleep, 30) for c in (root, leaf)]
    time.sleep(0.5)
    sessions = subprocess.run([sys.executable, SSHD_FIXTURE, 'sessions', str(sshd['pid'])],
                              check=True, capture_output=True, text=True).stdout.split()
    for pid in sessions:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    t0 = time.monotonic()
    for recv in pending:
        with pytest.raises(mitogen_native.core.ChannelError):
            recv.get(timeout=10)
    assert time.monotonic() - t0 < 3
    for c in (s, root, leaf):
        with pytest.raises(mitogen_native.core.ChannelError):
            c.call(os.getpid)
