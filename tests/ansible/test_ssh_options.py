"""Ansible's ssh settings -> connection stack hops (no ssh server needed)."""
from mitogen_native.ansible.ssh_options import ssh_stack


def target(**kw):
    hops, unsupported = ssh_stack('web1', **kw)
    return hops[-1], hops[:-1], unsupported


def test_ansible_settings_map_onto_the_hop():
    hop, jumps, unsupported = target(port=2222, user='deploy', password='pw',
                                     private_key_file='~/k', timeout=7,
                                     python_path=['/usr/bin/python3'])
    assert not jumps and not unsupported
    assert hop['method'] == 'ssh' and hop['hostname'] == 'web1'
    assert hop['port'] == 2222 and hop['username'] == 'deploy' and hop['password'] == 'pw'
    assert hop['identity_file'][0].endswith('/k') and not hop['identity_file'][0].startswith('~')
    assert hop['connect_timeout'] == 7 and hop['check_host_keys'] == 'enforce'
    assert hop['python_path'] == ['/usr/bin/python3']


def test_first_value_wins_in_the_stock_plugins_order():
    # ssh_args come before Ansible's own settings, ssh_common_args after them.
    hop, _, _ = target(port=2222, ssh_args='-o Port=1111', ssh_common_args='-o Port=3333')
    assert hop['port'] == 1111
    hop, _, _ = target(port=2222, ssh_common_args='-o Port=3333 -p 4444')
    assert hop['port'] == 2222
    hop, _, _ = target(ssh_common_args='-p 4444 -o Port=3333', ssh_extra_args='-o Port=5555')
    assert hop['port'] == 4444
    # IdentityFile accumulates, in order.
    hop, _, _ = target(private_key_file='/a', ssh_common_args='-i /b -o IdentityFile=/c')
    assert hop['identity_file'] == ['/a', '/b', '/c']


def test_host_key_options():
    assert target()[0]['check_host_keys'] == 'enforce'
    assert target(host_key_checking=False)[0]['check_host_keys'] == 'ignore'
    assert target(ssh_args='-o StrictHostKeyChecking=accept-new')[0]['check_host_keys'] == 'accept'
    hop = target(ssh_common_args='-o "UserKnownHostsFile=/k1 /k2" -o StrictHostKeyChecking yes')[0]
    assert hop['known_hosts_file'] == '/k1' and hop['check_host_keys'] == 'enforce'
    assert target(ssh_common_args='-o UserKnownHostsFile=/dev/null')[0]['known_hosts_file'] == '/dev/null'
    hop = target(ssh_common_args='-oServerAliveInterval=5 -oConnectTimeout=3 -F /cfg')[0]
    assert hop['keepalive_interval'] == 5 and hop['connect_timeout'] == 3
    assert hop['ssh_config_file'] == '/cfg'


def test_proxyjump_becomes_hops():
    hop, jumps, _ = target(private_key_file='/k', ssh_common_args='-J admin@bastion:2200,[::1]:22')
    assert [(j['hostname'], j.get('port'), j.get('username')) for j in jumps] == \
        [('bastion', 2200, 'admin'), ('::1', 22, None)]
    assert all(j['identity_file'] == ['/k'] for j in jumps)
    assert hop['hostname'] == 'web1'
    _, jumps, _ = target(ssh_common_args='-o ProxyJump=none')
    assert jumps == []


def test_unsupported_options_are_named_and_harmless_ones_are_not():
    _, _, unsupported = target(ssh_args='-C -o ControlMaster=auto -o ControlPersist=60s',
                               ssh_extra_args='-o ForwardX11=no -A -vvv -o Compression=yes')
    assert unsupported == ['ForwardX11', '-A']


def test_openssh_transport_gets_what_libssh2_cannot_do():
    hops, unsupported = ssh_stack('web1', ssh_extra_args='-o ForwardX11=no -J bastion',
                                  transport='openssh', ssh_executable='/opt/ssh')
    assert len(hops) == 1 and not unsupported
    assert hops[0]['transport'] == 'openssh' and hops[0]['ssh_path'] == '/opt/ssh'
    assert hops[0]['ssh_args'] == ['-o', 'ForwardX11=no', '-o', 'ProxyJump=bastion']
