import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_TESTS = os.path.join(HERE, '..', 'plugin')

# file_helpers (functions the tests run remotely) lives with the plugin tests;
# contexts import it from the controller through module forwarding.
if PLUGIN_TESTS not in sys.path:
    sys.path.insert(0, PLUGIN_TESTS)
import mitogen_native  # noqa: E402
os.environ['PYTHONPATH'] = os.pathsep.join(
    [PLUGIN_TESTS, os.path.dirname(os.path.dirname(os.path.abspath(mitogen_native.__file__)))] +
    [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])

import mitogen_native.master  # noqa: E402
import servers  # noqa: E402  (tests/plugin/servers.py)


@pytest.fixture(scope='module')
def sshd():
    with servers.started(servers.SSHD_FIXTURE) as info:
        yield info


@pytest.fixture
def router():
    broker = mitogen_native.master.Broker()
    yield mitogen_native.master.Router(broker)
    broker.shutdown()
    broker.join()


ssh_kwargs = servers.ssh_kwargs
