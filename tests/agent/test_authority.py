"""The agent obeys only its ancestors (docs/security.md, "Who may make a context
act"), driven through the fake master, which plays the parent (context 0) and,
by forging header fields, any other context a router would forward from."""
import os
import stat

import pytest

import fake_master as fm

STRANGER = 5     # a sibling's id: not 0, not the agent's own (1)


def _marker(tmp_path, name='ran'):
    return str(tmp_path / name)


def _call_from(master, src_id, auth_id, path, reply_to=0):
    master.send(fm.CALL_FUNCTION,
                master.call_payload('os', 'system', ('touch %s' % path,)),
                reply_to=reply_to, src_id=src_id, auth_id=auth_id)


def test_call_from_a_non_ancestor_is_refused_with_a_dead_reply(master, tmp_path):
    path = _marker(tmp_path)
    _call_from(master, STRANGER, STRANGER, path, reply_to=77)
    reply = master.recv(handle=77)
    assert reply.reply_to == fm.IS_DEAD
    assert reply.dst_id == STRANGER
    assert b'context 5 is not an ancestor of context 1' in reply.data
    # Not run, and the agent serves its parent as before.
    assert master.call('os', 'getpid') == master.pid
    assert not os.path.exists(path)


def test_call_carrying_the_parents_authority_is_obeyed(master, tmp_path):
    # What a router does for a trusted client of the master (the Ansible
    # multiplexer's workers): src is the client, auth_id is rewritten to 0.
    path = _marker(tmp_path)
    _call_from(master, STRANGER, 0, path, reply_to=78)
    reply = master.recv(handle=78)
    assert reply.dst_id == STRANGER and reply.reply_to == 0
    assert master.result(reply) == 0
    assert os.path.exists(path)


def test_shutdown_from_a_non_ancestor_is_ignored(master):
    master.send(fm.SHUTDOWN, b'', src_id=STRANGER)
    master.send(fm.SHUTDOWN, b'', src_id=0, auth_id=STRANGER)
    assert master.call('os', 'getpid') == master.pid
    master.shutdown()
    assert master.wait() == 0


def test_refusals_are_logged_once_per_sender(master, tmp_path):
    for _ in range(3):
        _call_from(master, STRANGER, STRANGER, _marker(tmp_path))
    _call_from(master, 6, 6, _marker(tmp_path))
    master.call('os', 'getpid')    # everything above was read by now
    master.wait_for_log(lambda r: 'context 6 is not an ancestor' in r[2])
    refusals = [r for r in master.logs if 'is not an ancestor' in r[2]]
    assert len(refusals) == 2, refusals
    assert refusals[0][1] == 30 and 'logged once per sender' in refusals[0][2]


def test_a_reply_handle_accepts_only_the_context_asked(spawn, tmp_path):
    """open_slot(peer): a reply from another context, or a dead message from a
    non-ancestor, is refused; the peer's answer, or an ancestor's dead message
    (a router saying the peer is unreachable), is delivered."""
    m = spawn()
    m.call_no_reply('agent_testmod', 'request_in_thread_from', 9, 3000, 'q')
    req = m.recv(handle=3000)
    assert req.dst_id == 9
    # Someone else answers, alive and dead: refused (dead reply to the first).
    m.send(req.reply_to, b'forged', src_id=STRANGER, reply_to=91)
    refused = m.recv(handle=91)
    assert refused.reply_to == fm.IS_DEAD and b'awaits a reply from another' in refused.data
    m.send(req.reply_to, b'gone?', src_id=STRANGER, reply_to=fm.IS_DEAD)
    # The peer's answer arrives.
    m.send(req.reply_to, b'answer', src_id=9)
    assert m.call('agent_testmod', 'thread_result', 'q')[0] == b'answer'
    # An ancestor's dead message reaches such a slot too.
    m.call_no_reply('agent_testmod', 'request_in_thread_from', 9, 3001, 'r')
    req = m.recv(handle=3001)
    m.send(req.reply_to, b'no route to context 9', src_id=0, reply_to=fm.IS_DEAD)
    assert m.call('agent_testmod', 'thread_result', 'r')[0] == b'no route to context 9'


def test_get_module_refusal_only_from_an_ancestor(master):
    """A stranger's dead message on the GET_MODULE reply handle does not make an
    import fail: only the parent's answer counts."""
    master.answer_modules = False
    master.serve_module('guarded', 'VALUE = 7\n')
    master.call_no_reply('builtins', 'eval', '__import__("guarded").VALUE', _chain=None)
    req = master.recv(handle=fm.GET_MODULE)
    master.send(req.reply_to, b'refused by a stranger', src_id=STRANGER,
                reply_to=fm.IS_DEAD)
    master.send_load_module('guarded')
    assert master.call('builtins', 'eval', '__import__("guarded").VALUE') == 7


# -- the debug log -------------------------------------------------------------

def _log_dir(tmp):
    return os.path.join(tmp, 'mitogen-%d' % os.geteuid())


def test_debug_log_is_private_and_fresh(spawn, testmod_env, tmp_path):
    env = dict(testmod_env, TMPDIR=str(tmp_path))
    m = spawn(debug=True, env=env)
    m.call('os', 'getpid')
    d = _log_dir(str(tmp_path))
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    path = os.path.join(d, 'mitogen.%d.log' % m.pid)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        text = f.read()
    assert 'bootstrap' in text and 'handle=101' in text


def test_debug_log_refuses_a_directory_others_can_write(spawn, testmod_env, tmp_path):
    d = _log_dir(str(tmp_path))
    os.mkdir(d)
    os.chmod(d, 0o777)     # as if another user had made it first
    env = dict(testmod_env, TMPDIR=str(tmp_path))
    m = spawn(debug=True, env=env)
    assert m.call('os', 'getpid') == m.pid      # the context works anyway
    assert os.listdir(d) == []                  # and wrote nothing there
    m.shutdown()
    m.wait()
    m._stderr_thread.join(5)
    assert b'no debug log' in m.stderr_data
    assert b'is not a private directory' in m.stderr_data


def test_debug_log_never_follows_a_planted_file(spawn, testmod_env, tmp_path):
    """A file already at the log's name (left by an earlier process with the same
    pid, or a symlink planted before the directory became private) is replaced,
    never appended to or followed."""
    env = dict(testmod_env, TMPDIR=str(tmp_path))
    m = spawn(env=env)
    d = _log_dir(str(tmp_path))
    os.mkdir(d, 0o700)
    victim = tmp_path / 'victim'
    victim.write_text('precious\n')
    path = os.path.join(d, 'mitogen.%d.log' % m.pid)
    os.symlink(str(victim), path)
    fd = m.call('mitogen.core', '_open_debug_log')
    assert isinstance(fd, int)
    assert victim.read_text() == 'precious\n'
    assert not os.path.islink(path) and os.path.isfile(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
