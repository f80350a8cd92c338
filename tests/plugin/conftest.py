import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# Contexts inherit our environment: let them import remote_helpers, and let
# subprocess-based tests import mitogen_native from wherever this run found it.
import mitogen_native  # noqa: E402  (after sys.path is final)
_paths = [HERE, os.path.dirname(os.path.dirname(os.path.abspath(mitogen_native.__file__)))]
os.environ['PYTHONPATH'] = os.pathsep.join(
    _paths + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import mitogen_native.master  # noqa: E402


@pytest.fixture
def broker():
    b = mitogen_native.master.Broker()
    yield b
    b.shutdown()
    b.join()


@pytest.fixture
def router(broker):
    return mitogen_native.master.Router(broker)


@pytest.fixture(scope='module')
def shared_router():
    b = mitogen_native.master.Broker()
    yield mitogen_native.master.Router(b)
    b.shutdown()
    b.join()


@pytest.fixture(scope='module')
def context(shared_router):
    """One context shared by a module's tests that do not break it."""
    return shared_router.local(remote_name='pytest-shared')


@pytest.fixture(scope='module')
def sshd():
    """A loopback sshd for this test module (servers.py)."""
    import servers
    with servers.started(servers.SSHD_FIXTURE) as info:
        yield info


@pytest.fixture(scope='module')
def become_users():
    """Users and sudoers/doas rules for the sudo/su/doas tests (servers.py)."""
    import servers
    with servers.started(servers.BECOME_FIXTURE) as info:
        yield info
