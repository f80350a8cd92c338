"""router.sudo() / su() / doas() through the Python API. Root never gets a password
prompt, so the tests escalate from throw-away unprivileged users
(tests/core/context/become/become_fixture.py; needs root, as CI has)."""
import logging
import os
import time

import pytest

import mitogen_native.core
import mitogen_native.master

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason='needs root to create its users')

WRONG = 'not-the-password-5678'


def cmdlines_up_from(pid):
    """Command lines of `pid` and its ancestors, up to (not including) us."""
    out = []
    while pid > 1 and pid != os.getpid() and len(out) < 10:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            out.append(f.read())
        with open('/proc/%d/stat' % pid) as f:
            pid = int(f.read().rsplit(')', 1)[1].split()[1])
    return out


def test_sudo_answers_the_prompt_and_runs_as_the_target(become_users, router, caplog):
    caplog.set_level(logging.DEBUG)
    ctx = router.sudo(username=become_users['nosudo_user'], sudo_path=become_users['sudo_as_test'],
                      password=become_users['test_password'], connect_timeout=30)
    assert ctx.name == 'sudo.' + become_users['nosudo_user']
    assert ctx.call(os.getuid) == become_users['nosudo_uid']
    lines = cmdlines_up_from(ctx.call(os.getpid))
    assert len(lines) >= 2
    assert not any(become_users['test_password'].encode() in l for l in lines)
    assert become_users['test_password'] not in caplog.text


def test_sudo_to_root_through_a_prompt(become_users, router):
    ctx = router.sudo(sudo_path=become_users['sudo_as_test'], password=become_users['test_password'],
                      sudo_args='-H -S -n', connect_timeout=30)
    assert ctx.call(os.getuid) == 0
    assert ctx.call(os.path.expanduser, '~') == '/root'   # -H was passed on
    time.sleep(1.5)   # the terminal stays open: sudo does not hang up the agent
    assert ctx.call(os.getuid) == 0


def test_sudo_from_root_needs_no_password(become_users, router):
    ctx = router.sudo(username=become_users['test_user'])
    assert ctx.call(os.getuid) == become_users['test_uid']


def test_sudo_wrong_password(become_users, router):
    t0 = time.monotonic()
    with pytest.raises(mitogen_native.core.PasswordError) as e:
        router.sudo(sudo_path=become_users['sudo_as_test'], password=WRONG, connect_timeout=30)
    assert time.monotonic() - t0 < 20
    assert isinstance(e.value, mitogen_native.core.StreamError)
    assert e.value.code == 'become_password_wrong'
    assert 'sudo password is incorrect' in str(e.value)
    assert WRONG not in str(e.value)


def test_sudo_password_required(become_users, router):
    with pytest.raises(mitogen_native.core.PasswordError) as e:
        router.sudo(sudo_path=become_users['sudo_as_test'], connect_timeout=30)
    assert 'sudo password is required' in str(e.value)
    assert e.value.code == 'become_password_required'


def test_sudo_not_in_sudoers(become_users, router):
    with pytest.raises(mitogen_native.core.StreamError) as e:
        router.sudo(sudo_path=become_users['sudo_as_nosudo'], password=become_users['nosudo_password'],
                    connect_timeout=30)
    assert not isinstance(e.value, mitogen_native.core.PasswordError)
    assert e.value.code == 'become_not_allowed'
    assert 'may not become root' in str(e.value)
    assert become_users['nosudo_password'] not in str(e.value)


def test_sudo_that_hangs_times_out_in_time(become_users, router):
    t0 = time.monotonic()
    with pytest.raises(mitogen_native.core.StreamError) as e:
        router.sudo(sudo_path=become_users['sudo_hang'], password='x', connect_timeout=2)
    took = time.monotonic() - t0
    assert 1.9 <= took < 10
    assert 'no bootstrap within 2000 ms' in str(e.value)
    assert 'no recognised password prompt' in str(e.value)


def test_custom_prompt(become_users, router):
    with pytest.raises(mitogen_native.core.StreamError):
        router.sudo(sudo_path=become_users['sudo_custom'], password=become_users['test_password'],
                    connect_timeout=2)
    ctx = router.sudo(sudo_path=become_users['sudo_custom'], password=become_users['test_password'],
                      password_prompts=['geheimwort'], connect_timeout=20)
    assert ctx.call(os.getuid) == 0


def test_german_prompt_is_a_default(become_users, router):
    ctx = router.sudo(sudo_path=become_users['sudo_german'], password=become_users['test_password'],
                      connect_timeout=20)
    assert ctx.call(os.getuid) == 0


def test_unsupported_sudo_arg(become_users, router):
    with pytest.raises(mitogen_native.core.StreamError, match="unsupported option '-X'"):
        router.sudo(sudo_args=['-X'])


def test_via_must_be_a_context(router):
    with pytest.raises(TypeError, match='via= must be a Context'):
        router.sudo(via=object())


def test_su(become_users, router):
    ctx = router.su(username=become_users['test_user'], su_path=become_users['su_as_nosudo'],
                    password=become_users['test_password'], connect_timeout=30)
    assert ctx.name == 'su.' + become_users['test_user']
    assert ctx.call(os.getuid) == become_users['test_uid']
    with pytest.raises(mitogen_native.core.PasswordError, match='su password is incorrect'):
        router.su(username=become_users['test_user'], su_path=become_users['su_as_nosudo'], password=WRONG,
                  connect_timeout=30)


@pytest.mark.skipif(not os.path.exists('/usr/bin/doas'), reason='opendoas not installed')
def test_doas(become_users, router):
    ctx = router.doas(doas_path=become_users['doas_as_test'], password=become_users['test_password'],
                      connect_timeout=30)
    assert ctx.name == 'doas.root'
    assert ctx.call(os.getuid) == 0
    with pytest.raises(mitogen_native.core.PasswordError, match='doas password is incorrect'):
        router.doas(doas_path=become_users['doas_as_test'], password=WRONG, connect_timeout=30)
    with pytest.raises(mitogen_native.core.StreamError, match='may not become root'):
        router.doas(doas_path=become_users['doas_as_nosudo'], password=become_users['nosudo_password'],
                    connect_timeout=30)


def test_sudo_login_shell(become_users, router):
    # -i: the interpreter is started by the target's login shell, in its home.
    ctx = router.sudo(username=become_users['test_user'], login=True, connect_timeout=30)
    assert ctx.call(os.getuid) == become_users['test_uid']
    assert ctx.call(os.getcwd) == '/home/' + become_users['test_user']


def test_output_to_the_terminal_after_boot_is_drained(become_users, router):
    # A program run by the context writes to /dev/tty (ours) long after the
    # bootstrap: far more than a terminal buffers. It must not block.
    import subprocess as sp
    ctx = router.sudo(username=become_users['test_user'], connect_timeout=30)
    time.sleep(0.5)
    rc = ctx.call(sp.call, ['sh', '-c', 'head -c 262144 /dev/zero | tr "\\0" x > /dev/tty'],
                  timeout=20)
    assert rc == 0


@pytest.mark.skipif(not os.path.exists('/usr/bin/doas'), reason='opendoas not installed')
def test_output_to_the_terminal_after_boot_is_drained_doas(become_users, router):
    # doas keeps no descriptor on the terminal after exec: the terminal has no
    # open slave side at all between the bootstrap and the write.
    import subprocess as sp
    ctx = router.doas(doas_path=become_users['doas_as_test'], password=become_users['test_password'],
                      connect_timeout=30)
    time.sleep(0.5)
    rc = ctx.call(sp.call, ['sh', '-c', 'head -c 262144 /dev/zero | tr "\\0" x > /dev/tty'],
                  timeout=20)
    assert rc == 0
