"""What only mitogen.native.ssh does, or does its own way: checked on its own
(no stock run to compare with)."""
import tempfile

import runner
from runner import OURS


def test_unsupported_ssh_option_warned_once_per_run(world):
    gv = {'ansible_ssh_extra_args': '-o ForwardX11=no -o ServerAliveCountMax=2 -C'}
    ours = runner.run(world, 'strategy.yml', OURS, group_vars=gv)
    assert ours.rc == 0, ours.output()
    for option in ('ForwardX11', 'ServerAliveCountMax'):
        lines = [l for l in ours.stderr.splitlines() if option in l]
        assert len(lines) == 1, (option, ours.stderr)
        assert 'not supported' in lines[0], lines
    assert '-C' not in ours.stderr      # compression: accepted silently


def test_proxyjump_is_a_hop(world):
    # h2 through h1: a context on h1 runs ssh to h2 (as mitogen-test, with a
    # key and known_hosts that user can read), the target's agent is its child.
    jump = '%s@127.0.0.1:%d' % (world['user'], world['port'])
    gv = {
        'ansible_ssh_private_key_file': world['jump_identity_file'],
        'ansible_ssh_common_args': '-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes '
                                   '-o ProxyJump=%s' % (world['jump_known_hosts'], jump),
    }
    ours = runner.run(world, 'proxyjump.yml', OURS, hosts=('h2',), group_vars=gv)
    assert ours.rc == 0, ours.output()
    out = ours.result('where we are and who connected us', 'h2')['result']['stdout']
    assert 'server=127.0.0.2' in out, out
    assert 'ssh-parent=' in out and 'mitogen:' in out.split('ssh-parent=', 1)[1], out
    assert ours.result('module through the jump host', 'h2')['result']['stdout'] == world['user']


def test_templated_connection_variables(world):
    # Every connection variable a template, resolved by Ansible before the
    # plugin reads it (TaskExecutor templates declared options).
    hv = {'h1': {'ansible_host': '{{ real_host }}'}}
    gv = {'ansible_port': '{{ real_port }}', 'ansible_user': '{{ real_user }}',
          'ansible_ssh_private_key_file': '{{ real_key }}'}
    extra = {'real_host': '127.0.0.1', 'real_port': world['port'], 'real_user': world['user'],
             'real_key': world['identity_file']}
    ours = runner.run(world, 'strategy.yml', OURS, hosts=('h1',), host_vars=hv,
                      group_vars=gv, extra_vars=extra)
    assert ours.rc == 0, ours.output()
    assert ours.stats['h1']['ok'] == 4


def test_one_connection_object_reconnects_and_resets(world, tmp_path):
    """In one process, as a worker (loops) and the top-level process (reset)
    use it: exact bytes both ways, a dead agent fails one command and the next
    reconnects, reset() with still-templated options forgets the context."""
    import json
    import os
    import subprocess
    import sys
    info = tmp_path / 'world.json'
    info.write_text(json.dumps(world))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=world['collections_path'])
    p = subprocess.run([sys.executable, os.path.join(runner.HERE, 'direct_connection.py'),
                        str(info)], capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    # Loops reuse a connection only if matches_name() agrees; ssh is not us.
    assert out['matches_ours'] and not out['matches_builtin'], out
    assert out['bytes'] == {'rc': 7, 'stdout': 'a\x00b\xff\n', 'stderr': 'e\r\n'}, out
    assert out['stdin'] == {'rc': 0, 'stdout': '\x00\x01 binary stdin\n', 'stderr': ''}, out
    assert out['first'] == out['again'], out          # one agent
    assert 'lost' in out['kill']['error'], out
    assert out['after_kill']['rc'] == 0 and out['after_kill'] != out['first'], out
    assert out['connected_after_reset'] is False
    assert out['after_reset']['rc'] == 0 and out['after_reset'] != out['after_kill'], out


def test_multi_gib_files_travel_both_ways_in_bounded_memory(world, tmp_path):
    """put_file and fetch_file stream: a 2 GiB file (sparse here, data at both
    ends) arrives whole both ways, its mode kept, while neither the process
    that transfers it nor the daemon grows by more than a few MiB."""
    import json
    import os
    import subprocess
    import sys
    info = tmp_path / 'world.json'
    info.write_text(json.dumps(world))
    run_dir = tempfile.mkdtemp(prefix='mna-big-', dir=world['runs_dir'])
    runner.make_dirs(run_dir)
    mib = 2 * 1024
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=world['collections_path'])
    p = subprocess.run([sys.executable, os.path.join(runner.HERE, 'direct_connection.py'),
                        str(info), 'big', run_dir, str(mib)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out['size'] == mib << 20 and out['same'], out
    assert out['remote_mode'] == '0o640', out
    assert out['grew_kib'] < 64 * 1024, out            # not the file: a few buffers
    assert out['daemon_peak_kib'] < 128 * 1024, out


def test_openssh_transport_takes_every_option(world):
    gv = {'ansible_ssh_extra_args': '-o ForwardX11=no -o ServerAliveCountMax=2',
          'ansible_mitogen_ssh_transport': 'openssh'}
    ours = runner.run(world, 'strategy.yml', OURS, hosts=('h1',), group_vars=gv)
    assert ours.rc == 0, ours.output()
    assert 'not supported' not in ours.stderr, ours.stderr
    assert ours.result('probe', 'h1')['result']['parent_is_agent'] is True


def test_password_authentication(world):
    # No key at all: the password (which the stock plugin would need sshpass for).
    gv = {'ansible_ssh_private_key_file': None, 'ansible_password': world['password'],
          'ansible_ssh_common_args': '-o UserKnownHostsFile=%s -o IdentityFile=/nonexistent'
                                     % world['known_hosts']}
    ours = runner.run(world, 'ping.yml', OURS, hosts=('h1',), group_vars=gv,
                      env={'SSH_AUTH_SOCK': ''})
    assert ours.rc == 0, ours.output()
    assert ours.result('ping', 'h1')['status'] == 'ok'
