"""router.ssh() through the Python API, against a throw-away loopback sshd
(tests/core/context/ssh/sshd_fixture.py; needs root, as CI has)."""
import os

import pytest

import mitogen_native.core
import mitogen_native.master

from servers import CAN_RUN_SSHD

pytestmark = pytest.mark.skipif(
    not CAN_RUN_SSHD, reason='needs root and openssh-server for a loopback sshd')


def test_key_login_runs_code_as_the_remote_user(sshd, router):
    import getpass
    ctx = router.ssh(hostname='127.0.0.1', port=sshd['port'], username=sshd['user'],
                     identity_file=sshd['identity_file'],
                     known_hosts_file=sshd['known_hosts'], connect_timeout=20)
    assert ctx.call(getpass.getuser) == sshd['user']
    assert ctx.call(os.getpid) != os.getpid()


def test_password_login(sshd, router):
    ctx = router.ssh(hostname='127.0.0.1', port=sshd['port'], username=sshd['user'],
                     password=sshd['password'], identity_file=[],
                     known_hosts_file=sshd['known_hosts'], connect_timeout=20)
    assert ctx.call(os.getuid) != os.getuid()


def test_wrong_password_is_refused(sshd, router):
    with pytest.raises(mitogen_native.core.StreamError):
        router.ssh(hostname='127.0.0.1', port=sshd['port'], username=sshd['user'],
                   password='not the password', identity_file=[],
                   known_hosts_file=sshd['known_hosts'], connect_timeout=20)


def test_changed_host_key_is_refused_with_its_fingerprint(sshd, router):
    with pytest.raises(mitogen_native.core.StreamError) as e:
        router.ssh(hostname='127.0.0.1', port=sshd['port'], username=sshd['user'],
                   identity_file=sshd['identity_file'],
                   known_hosts_file=sshd['wrong_known_hosts'], connect_timeout=20)
    assert sshd['host_fingerprint'] in str(e.value)


def test_errors_carry_upstream_classes_and_codes(sshd, router, tmp_path):
    import mitogen_native.ssh
    with pytest.raises(mitogen_native.ssh.HostKeyError) as e:
        router.ssh(hostname='127.0.0.1', port=sshd['port'], username=sshd['user'],
                   identity_file=sshd['identity_file'],
                   known_hosts_file=sshd['wrong_known_hosts'], connect_timeout=20)
    assert e.value.code == 'host_key_mismatch'
    empty = tmp_path / 'known_hosts'
    empty.write_text('')
    with pytest.raises(mitogen_native.ssh.HostKeyError) as e:
        router.ssh(hostname='127.0.0.1', port=sshd['port'], username=sshd['user'],
                   identity_file=sshd['identity_file'],
                   known_hosts_file=str(empty), connect_timeout=20)
    assert e.value.code == 'host_key_unknown'
    with pytest.raises(mitogen_native.ssh.PasswordError) as e:
        router.ssh(hostname='127.0.0.1', port=sshd['port'], username=sshd['user'],
                   password='not the password', identity_file=[], use_agent=False,
                   known_hosts_file=sshd['known_hosts'], connect_timeout=20)
    assert e.value.code == 'auth_failed'
    assert isinstance(e.value, mitogen_native.core.StreamError)
