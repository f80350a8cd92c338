"""The throw-away servers and users some Python API tests need (root only, as
CI runs): the loopback sshd of tests/core/context/ssh/sshd_fixture.py and the sudo/su/doas
users and rules of tests/core/context/become/become_fixture.py. conftest.py turns them
into the `sshd` and `become_users` fixtures; tests/files uses them too."""
import contextlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SSHD_FIXTURE = os.path.join(HERE, '..', 'core', 'context', 'ssh', 'sshd_fixture.py')
BECOME_FIXTURE = os.path.join(HERE, '..', 'core', 'context', 'become', 'become_fixture.py')

CAN_RUN_SSHD = os.geteuid() == 0 and os.path.exists('/usr/sbin/sshd')


@contextlib.contextmanager
def started(fixture):
    """Run `fixture start`, yield what it printed (JSON), `stop` it afterwards."""
    out = subprocess.run([sys.executable, fixture, 'start'], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    info = json.loads(out)
    try:
        yield info
    finally:
        subprocess.run([sys.executable, fixture, 'stop', info['dir']], timeout=60)


def ssh_kwargs(sshd, **extra):
    """router.ssh() arguments for the fixture's user, key and known_hosts."""
    kwargs = dict(hostname='127.0.0.1', port=sshd['port'], username=sshd['user'],
                  identity_file=sshd['identity_file'],
                  known_hosts_file=sshd['known_hosts'], connect_timeout=20)
    kwargs.update(extra)
    return kwargs
