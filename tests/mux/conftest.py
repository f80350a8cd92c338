"""Fixtures for the multiplexer daemon's client tests: each test gets a daemon
socket in a private directory of its own (so tests never share, or kill,
someone else's daemon), a settings file there, and the daemon is stopped
afterwards."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_TESTS = os.path.join(HERE, '..', 'plugin')
# servers.py (the loopback sshd and become users) lives with the Python API's tests.
sys.path.insert(0, PLUGIN_TESTS)

import mitogen_native  # noqa: E402
import mitogen_native.mux  # noqa: E402

# Processes the tests start import mitogen_native from wherever this run found it.
_pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(mitogen_native.__file__)))
os.environ['PYTHONPATH'] = os.pathsep.join(
    [HERE, _pkg_parent] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])


from mux_helpers import private_daemon  # noqa: E402


@pytest.fixture
def mux_env(monkeypatch):
    with private_daemon() as env:
        monkeypatch.setenv(mitogen_native.mux.SOCKET_ENV, env.socket)
        monkeypatch.setenv('MITOGEN_MUX_CONFIG', env.config)
        yield env


@pytest.fixture(scope='module')
def sshd():
    """The loopback sshd of tests/plugin/servers.py (root only)."""
    import servers
    if not servers.CAN_RUN_SSHD:
        pytest.skip('needs root and /usr/sbin/sshd to start the loopback sshd')
    with servers.started(servers.SSHD_FIXTURE) as info:
        yield info


@pytest.fixture(scope='module')
def become_users():
    """Users and sudoers rules of tests/plugin/servers.py (root only)."""
    import servers
    if os.geteuid() != 0:
        pytest.skip('needs root to create its users')
    with servers.started(servers.BECOME_FIXTURE) as info:
        yield info
