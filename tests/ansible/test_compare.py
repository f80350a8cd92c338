"""Real ansible-playbook runs against the loopback sshd, each scenario with the
stock ssh plugin (pipelining, ControlPersist) and with mitogen.native.ssh,
compared result by result (see runner.py for what is normalized)."""
import os
import socket

import pytest

import runner
from runner import OURS, STOCK


@pytest.fixture(scope='module')
def inputs(world):
    """Files the playbooks copy and run: 3 MiB of binary data, a script."""
    d = os.path.join(world['dir'], 'inputs')
    os.makedirs(d, exist_ok=True)
    data = os.path.join(d, 'data.bin')
    with open(data, 'wb') as f:
        block = bytes(range(256)) * 4096
        for i in range(3):
            f.write(block)
    os.chmod(data, 0o644)
    script = os.path.join(d, 'script.sh')
    with open(script, 'w') as f:
        f.write('#!/bin/sh\necho "script args: $*"\necho "to stderr" >&2\nexit 0\n')
    os.chmod(script, 0o755)
    return {'data_file': data, 'script_file': script}


def both(world, playbook, **kw):
    stock = runner.run(world, playbook, STOCK, **kw)
    ours = runner.run(world, playbook, OURS, **kw)
    return stock, ours


def test_basics_match_stock(world, inputs):
    # h2 names its interpreter, h3 asks for silent discovery: the agent runs on
    # that interpreter, and modules that ask for it run in a fork of the agent.
    host_vars = {'h2': {'ansible_python_interpreter': '/usr/bin/python3'},
                 'h3': {'ansible_python_interpreter': 'auto_silent'}}
    stock, ours = both(world, 'basics.yml', extra_vars=inputs, host_vars=host_vars)
    assert stock.rc == 0, stock.output()
    runner.assert_same(stock, ours)
    # The modules ran in a fork of the warm agent, not in a new interpreter.
    for host in ('h1', 'h2', 'h3'):
        assert ours.result('probe', host)['result']['parent_is_agent'] is True
        assert stock.result('probe', host)['result']['parent_is_agent'] is False


def test_become_matches_stock(world, inputs):
    extra = dict(inputs, test_password=world['password'], nopw_user=world['nopw_user'],
                 nosudo_user=world['nosudo_user'], nosudo_password=world['nosudo_password'])
    # No setfacl here: an unprivileged become user reads Ansible's temporary
    # files because they are made world-readable (as a stock user must allow).
    gv = {'ansible_shell_allow_world_readable_temp': 'true'}
    stock, ours = both(world, 'become.yml', extra_vars=extra, group_vars=gv,
                       hosts=('h1', 'h2'))
    assert stock.rc == 0, stock.output()
    # A known difference (docs/ansible.md): under `ssh -tt`, the stock plugin
    # answers sudo's prompt on the terminal, and the newline the terminal
    # prints after the hidden password stays at the head of stdout. Ours
    # answered the prompt once, when the become context started.
    for r in stock.results('raw as root'):
        res = r['result']
        assert res['stdout'].startswith('\r\n'), res
        res['stdout'] = res['stdout'][2:]
        res['stdout_lines'] = res['stdout_lines'][1:]
    runner.assert_same(stock, ours)
    for host in ('h1', 'h2'):
        assert ours.result('whoami root', host)['result']['stdout'] == 'root'
        assert ours.result('whoami su', host)['result']['stdout'] == world['nosudo_user']
        # Pipelined modules ran in a fork of the become context's agent.
        assert ours.result('probe as root', host)['result']['parent_is_agent'] is True
        assert ours.result('probe nopw', host)['result']['parent_is_agent'] is True


def test_become_failures_match_stock(world):
    extra = dict(nosudo_user=world['nosudo_user'])
    stock, ours = both(world, 'become_errors.yml', extra_vars=extra, hosts=('h1',))
    runner.assert_same(stock, ours)
    r = ours.result('sudo with a wrong password', 'h1')
    assert r['status'] == 'failed' and r['result']['msg'] == 'Incorrect sudo password', r
    r = ours.result('sudo without the password it needs', 'h1')
    assert r['status'] == 'failed' and r['result']['msg'] == 'Missing sudo password', r


def _closed_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_matches_stock(world):
    silent = socket.socket()     # accepts TCP connections, never says a word
    silent.bind(('127.0.0.1', 0))
    silent.listen(16)
    try:
        wrong = '-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes' % world['wrong_known_hosts']
        unknown = '-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes'
        host_vars = {
            'refused': {'ansible_port': _closed_port()},
            'badkey': {'ansible_ssh_private_key_file': world['stranger_key']},
            'hostkey': {'ansible_host': '127.0.0.3', 'ansible_ssh_common_args': wrong},
            'unknown': {'ansible_host': '127.0.0.2', 'ansible_ssh_common_args': unknown},
            'silent': {'ansible_port': silent.getsockname()[1], 'ansible_ssh_timeout': 3},
        }
        hosts = sorted(host_vars)
        stock, ours = both(world, 'ping.yml', hosts=hosts, host_vars=host_vars)
    finally:
        silent.close()
    for run in (stock, ours):
        for h in hosts:
            assert run.result('ping', h)['status'] == 'unreachable', run.output()
    assert stock.stats == ours.stats
    msg = dict((h, ours.result('ping', h)['result']['msg']) for h in hosts)
    assert 'refused' in msg['refused'].lower(), msg
    assert 'auth' in msg['badkey'].lower(), msg
    # The key the server offered, which known_hosts does not have.
    assert world['host_fingerprint'] in msg['hostkey'], msg
    assert 'ssh-keygen -R' in msg['hostkey'], msg
    assert world['host_fingerprint'] in msg['unknown'], msg
    assert 'within 3000 ms' in msg['silent'], msg
    # Within the 3 s timeout (plus ansible-playbook's own start and finish).
    assert ours.elapsed < 3 + 15, ours.elapsed


def test_reset_connection(world):
    extra = {'login_user': world['user']}
    stock, ours = both(world, 'reset.yml', extra_vars=extra, hosts=('h1', 'h2'))
    assert stock.rc == 0, stock.output()
    # $PPID is the ssh session (stock) or the agent (ours): not compared.
    runner.assert_same(stock, ours, skip_tasks=('before reset', 'after reset'))
    assert 'cannot reset' not in ours.stderr, ours.stderr
    for h in ('h1', 'h2'):
        before = ours.result('before reset', h)['result']['stdout']
        after = ours.result('after reset', h)['result']['stdout']
        assert before != after, 'the same agent before and after reset_connection'


def test_local_matches_stock(world, inputs):
    extra = dict(inputs, nopw_user=world['nopw_user'])
    stock = runner.run(world, 'local.yml', runner.STOCK_LOCAL, hosts=('h1',), extra_vars=extra)
    ours = runner.run(world, 'local.yml', runner.OURS_LOCAL, hosts=('h1',), extra_vars=extra)
    assert stock.rc == 0, stock.output()
    runner.assert_same(stock, ours)
    assert ours.result('probe', 'h1')['result']['parent_is_agent'] is True


def test_loop_reuses_context_and_killed_agent_fails_one_task(world):
    ours = runner.run(world, 'agent_killed.yml', OURS, hosts=('h1', 'h2'))
    for h in ('h1', 'h2'):
        items = ours.result('one context for a loop', h)['result']['results']
        assert len(items) == 3 and len(set(i['stdout'] for i in items)) == 1, items
        killed = ours.result('kill the agent', h)
        assert killed['status'] == 'failed', killed
        assert 'connection to' in killed['result']['msg'] and 'lost' in killed['result']['msg']
        assert ours.result('next task', h)['status'] == 'ok'
        assert ours.stats[h]['unreachable'] == 0 and ours.stats[h]['ignored'] == 1


@pytest.mark.parametrize('strategy', ['free', 'host_pinned', 'debug'])
def test_stock_strategies(world, strategy):
    ours = runner.run(world, 'strategy.yml', OURS, env={'ANSIBLE_STRATEGY': strategy},
                      name='strategy-' + strategy)
    assert ours.rc == 0, ours.output()
    for h in ('h1', 'h2', 'h3'):
        assert ours.stats[h]['ok'] == 4 and ours.stats[h]['failures'] == 0, ours.stats
        assert ours.result('probe', h)['result']['parent_is_agent'] is True


def test_ssh_agent_and_ssh_config_match_stock(world, tmp_path):
    """No key file named: the key comes from the ssh agent; the address, port
    and user of one host come from an ssh client configuration (-F)."""
    import subprocess
    agent = subprocess.run(['ssh-agent', '-s'], capture_output=True, text=True, check=True).stdout
    env = dict(line.split(';', 1)[0].split('=', 1) for line in agent.splitlines()
               if '=' in line.split(';', 1)[0])
    try:
        subprocess.run(['ssh-add', '-q', world['identity_file']], env=dict(os.environ, **env),
                       check=True, capture_output=True)
        cfg = tmp_path / 'ssh_config'
        cfg.write_text('Host via-config\n  HostName 127.0.0.3\n  Port %d\n  User %s\n'
                       % (world['port'], world['user']))
        os.chmod(str(cfg), 0o644)
        common = '-F %s -o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes' % (
            cfg, world['known_hosts'])
        gv = {'ansible_ssh_private_key_file': None, 'ansible_port': None, 'ansible_user': None,
              'ansible_ssh_common_args': common}
        hv = {'via-config': {'ansible_host': 'via-config'}}
        stock, ours = both(world, 'strategy.yml', hosts=('via-config',), group_vars=gv,
                           host_vars=hv, env=env)
    finally:
        subprocess.run(['ssh-agent', '-k'], env=dict(os.environ, **env), capture_output=True)
    assert stock.rc == 0, stock.output()
    runner.assert_same(stock, ours)
