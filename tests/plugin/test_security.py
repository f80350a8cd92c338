"""A context obeys only its ancestors (issue 10, docs/security.md "Who may make a
context act").

Each attack asks its victim to run ``os.system('id > PATH')`` (or to shut down)
with a raw CALL_FUNCTION / SHUTDOWN, as a compromised context would. Every case
checks that the attacker was refused (a dead reply naming who refused), that the
victim ran nothing (PATH does not exist, although the same call from the master
does create it: the positive control) and that the victim still answers. Every
case runs twice: with the router's default (permissive: the victim's agent
refuses) and with ``router.unidirectional = True`` (the master refuses first)."""
import os
import shutil
import tempfile

import pytest

import mitogen_native.master
import security_helpers as sh
from servers import CAN_RUN_SSHD, ssh_kwargs

AGENT_REFUSES = 'is not an ancestor'
MASTER_REFUSES = 'unidirectional'

needs_sshd = pytest.mark.skipif(
    not CAN_RUN_SSHD, reason='needs root and openssh-server for a loopback sshd and test users')


@pytest.fixture(params=[False, True], ids=['permissive', 'unidirectional'])
def router(request, broker):
    r = mitogen_native.master.Router(broker)
    r.unidirectional = request.param
    return r


@pytest.fixture
def drop():
    """A world-writable directory (sticky, as /tmp) where the attacks' payload would
    leave its mark, whichever user the victim runs as."""
    d = tempfile.mkdtemp(prefix='mitogen-security-')
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def expected_refusal(router, attacker_is_child_of_victim=False):
    """Who refuses: the master when it is unidirectional (for messages it would
    forward between two children's subtrees), else the victim's own agent."""
    if router.unidirectional and not attacker_is_child_of_victim:
        return MASTER_REFUSES
    return AGENT_REFUSES


def assert_attacks_fail(attacker, victim, drop, expect):
    """Every attack of `attacker` on `victim` fails, leaves no mark, and the
    victim keeps answering (with the same process)."""
    path = os.path.join(drop, 'pwned')
    # Positive control: the same request from the master does run.
    assert victim.call(os.system, sh.run_as(path)) == 0
    assert os.path.exists(path), 'the payload cannot leave its mark: the test would prove nothing'
    os.unlink(path)
    pid = victim.call(os.getpid)

    status, reason = attacker.call(sh.attack_call, victim.context_id, path)
    assert status == 'dead', 'the victim obeyed: %r' % (reason,)
    assert expect in reason
    # As issue 10 wrote it (no reply asked), then SHUTDOWN. The frames reach the
    # victim before our next call does (same streams, in order).
    assert attacker.call(sh.attack_fire_and_forget, victim.context_id, path)
    assert attacker.call(sh.attack_shutdown, victim.context_id)
    assert victim.call(os.getpid) == pid
    assert not os.path.exists(path)


def test_sibling(router, drop):
    a, b = router.local(), router.local()
    assert_attacks_fail(a, b, drop, expected_refusal(router))
    assert_attacks_fail(b, a, drop, expected_refusal(router))


def test_grandchild_attacks_its_parents_sibling(router, drop):
    a, b = router.local(), router.local()
    g = router.local(via=a)
    assert_attacks_fail(g, b, drop, expected_refusal(router))


def test_context_attacks_a_siblings_child(router, drop):
    a, b = router.local(), router.local()
    bc = router.local(via=b)
    assert_attacks_fail(a, bc, drop, expected_refusal(router))


def test_child_attacks_its_own_parent(router, drop):
    # The master is not on this path: the intermediary's agent refuses.
    a = router.local()
    g = router.local(via=a)
    assert_attacks_fail(g, a, drop, AGENT_REFUSES)


def test_forged_auth_ids_are_dropped(router, drop):
    """Frames whose header claims the master's (or the victim's parent's)
    authority never arrive: the master, or the intermediary the forger sits
    below, checks auth_id against the stream it came on."""
    a, b = router.local(), router.local()
    g = router.local(via=a)
    path = os.path.join(drop, 'pwned')
    pid_a, pid_b = a.call(os.getpid), b.call(os.getpid)
    # a claims the master's authority towards its sibling.
    assert a.call(sh.forge, b.context_id, a.context_id, 0, path)
    # g claims its parent's authority towards its parent and its parent's sibling,
    # and the master's towards both.
    for auth in (a.context_id, 0):
        for victim in (a, b):
            assert g.call(sh.forge, victim.context_id, g.context_id, auth, path)
            assert g.call(sh.forge, victim.context_id, g.context_id, auth, path,
                          sh.c.SHUTDOWN)
    # a claims to be its own child g, acting with g's authority on b: forwarded
    # (a speaks for g) but b's agent, or the unidirectional master, refuses it.
    assert a.call(sh.forge, b.context_id, g.context_id, g.context_id, path)
    assert (a.call(os.getpid), b.call(os.getpid)) == (pid_a, pid_b)
    assert g.call(sh.context_id) == g.context_id
    assert not os.path.exists(path)


def test_channels_handed_over_work_in_both_modes(router):
    """A Sender the program hands from one context to another keeps working,
    also when the router is unidirectional (the handing-over grants it)."""
    import channel_helpers
    a, b = router.local(), router.local()
    sender = b.call(channel_helpers.make_receiver)
    assert a.call(channel_helpers.send_few, sender, 'from-a', 3, True)
    out, _ = b.call(channel_helpers.drain)
    assert [(src, tuple(v)) for src, v in out] == [(a.context_id, ('from-a', i)) for i in range(3)]


@needs_sshd
def test_ssh_context_attacks_a_local_one_and_the_reverse(router, sshd, drop):
    s = router.ssh(**ssh_kwargs(sshd))
    local = router.local()
    assert_attacks_fail(s, local, drop, expected_refusal(router))
    assert_attacks_fail(local, s, drop, expected_refusal(router))


@needs_sshd
def test_sudo_context_attacked_by_its_ssh_parents_sibling(router, sshd, become_users, drop):
    s = router.ssh(**ssh_kwargs(sshd))
    root = router.sudo(via=s, password=sshd['password'], connect_timeout=20)
    assert root.call(os.getuid) == 0
    sibling = router.local()
    assert_attacks_fail(sibling, root, drop, expected_refusal(router))
    # ... and by a context below its parent's sibling.
    below = router.local(via=sibling)
    assert_attacks_fail(below, root, drop, expected_refusal(router))
    # Its own parent, the ssh context, is an ancestor: it may (the positive case).
    path = os.path.join(drop, 'by-parent')
    status, result = s.call(sh.attack_call, root.context_id, path)
    assert (status, result) == ('ok', 0)
    assert os.path.exists(path)
