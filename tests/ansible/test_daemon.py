"""The multiplexer daemon under real ansible-playbook runs (issue 12 §1, §5, §6):
parallel runs share one daemon and one context per host, a later run reuses the
warm contexts, a daemon killed between two tasks hangs nothing and is replaced,
and an idle daemon exits. Each test has a daemon of its own (socket, settings,
log in a private directory: mux_helpers.MuxEnv). That another uid cannot attach
is tested on the client the plugins use (tests/mux/test_mux_client.py)."""
import os
import sys
import threading

import pytest

import runner
from runner import OURS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'mux'))
from mux_helpers import pid_alive, private_daemon, wait_for  # noqa: E402

HOSTS = ('h1', 'h2', 'h3')


@pytest.fixture
def daemon():
    with private_daemon('mux-ansible-') as env:
        yield env


def _env(daemon):
    import mitogen_native.mux
    return {mitogen_native.mux.SOCKET_ENV: daemon.socket, 'MITOGEN_MUX_CONFIG': daemon.config}


def _run(world, daemon, name, kill_daemon=0):
    r = runner.run(world, 'daemon.yml', OURS, hosts=HOSTS, env=_env(daemon), name=name,
                   extra_vars={'kill_daemon': kill_daemon}, timeout=180)
    assert r.rc == 0, r.output()
    return r


def _agents(run, task):
    """{host: pid of the agent that ran `task` there}."""
    return {h: int(run.result(task, h)['result']['stdout'].strip()) for h in HOSTS}


def test_two_runs_at_once_share_one_daemon_and_a_later_run_reuses_its_contexts(world, daemon):
    runs = [None, None]

    def go(i):
        runs[i] = _run(world, daemon, 'daemon-parallel-%d' % i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(runs), 'a run failed (its assertion is printed above)'
    first = _agents(runs[0], 'before')
    # One context per host, shared by both runs and by every task of each.
    assert _agents(runs[1], 'before') == first
    assert _agents(runs[0], 'after') == first and _agents(runs[1], 'after') == first
    assert len(set(first.values())) == len(HOSTS), first
    assert len(daemon.daemon_pids()) == 1, daemon.daemon_pids()
    # A later run finds the same agents warm: nothing was bootstrapped again.
    later = _run(world, daemon, 'daemon-later')
    assert _agents(later, 'before') == first
    assert all(pid_alive(p) for p in first.values())


def test_a_daemon_killed_between_two_tasks_is_replaced(world, daemon):
    import mitogen_native.mux
    # Start the daemon first, to know which process to kill.
    os.environ.update(_env(daemon))
    try:
        c = mitogen_native.mux.attach()
        old = c.daemon_pid
        c.detach()
    finally:
        for k in _env(daemon):
            del os.environ[k]
    r = _run(world, daemon, 'daemon-killed', kill_daemon=old)
    before, after = _agents(r, 'before'), _agents(r, 'after')
    for h in HOSTS:
        assert r.stats[h]['failures'] == 0 and r.stats[h]['unreachable'] == 0, r.stats
        assert r.result('after', h)['status'] == 'ok'
    assert not pid_alive(old)
    # The next task started a new daemon, which made new contexts; the old
    # agents went with the old daemon.
    new = daemon.daemon_pids()
    assert len(new) == 1 and new[0] != old, new
    assert all(before[h] != after[h] for h in HOSTS), (before, after)
    wait_for(lambda: not any(pid_alive(p) for p in before.values()), what='the old agents to exit')


def test_an_idle_daemon_exits_after_the_run(world, daemon):
    daemon.write_config(idle_timeout=2)
    r = _run(world, daemon, 'daemon-idle')
    agents = _agents(r, 'after')
    pids = daemon.daemon_pids()
    assert len(pids) == 1, pids
    wait_for(lambda: not pid_alive(pids[0]), timeout=30, what='the idle daemon to exit')
    wait_for(lambda: not any(pid_alive(p) for p in agents.values()), timeout=30,
             what='its agents to exit')
    assert 'no client for 2 s' in daemon.read_log()
