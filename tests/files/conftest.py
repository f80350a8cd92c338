import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_TESTS = os.path.join(HERE, '..', 'plugin')
FIXTURE = os.path.join(HERE, '..', 'core', 'ssh', 'sshd_fixture.py')

# file_helpers (functions the tests run remotely) lives with the plugin tests;
# contexts import it from the controller through module forwarding.
if PLUGIN_TESTS not in sys.path:
    sys.path.insert(0, PLUGIN_TESTS)
import mitogen_native  # noqa: E402
os.environ['PYTHONPATH'] = os.pathsep.join(
    [PLUGIN_TESTS, os.path.dirname(os.path.dirname(os.path.abspath(mitogen_native.__file__)))] +
    [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])

import mitogen_native.master  # noqa: E402


@pytest.fixture(scope='module')
def sshd():
    out = subprocess.run([sys.executable, FIXTURE, 'start'], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    info = json.loads(out)
    yield info
    subprocess.run([sys.executable, FIXTURE, 'stop', info['dir']], timeout=60)


@pytest.fixture
def router():
    broker = mitogen_native.master.Broker()
    yield mitogen_native.master.Router(broker)
    broker.shutdown()
    broker.join()


def ssh_kwargs(sshd):
    return dict(hostname='127.0.0.1', port=sshd['port'], username=sshd['user'],
                identity_file=sshd['identity_file'],
                known_hosts_file=sshd['known_hosts'], connect_timeout=20)
