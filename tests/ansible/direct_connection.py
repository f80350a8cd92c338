#!/usr/bin/python3
"""Drive mitogen.native.ssh the way Ansible does, inside one process, for
what a playbook cannot show on its own: one connection object reconnecting
after its agent died, reset() with options that are still templates (what
the top-level process hands it for meta: reset_connection), exact bytes.

    direct_connection.py WORLD_JSON   (ANSIBLE_COLLECTIONS_PATH must be set)
    direct_connection.py WORLD_JSON big DIR MIB
        put_file then fetch_file of a MIB MiB file through DIR (on the target,
        writable by the ssh user): sizes, digests, modes and peak memory

Prints one JSON object with what it saw.
"""
import hashlib
import json
import os
import sys

from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import _configure_collection_loader, connection_loader


def connect(world):
    _configure_collection_loader()
    pc = PlayContext()
    pc.remote_addr = '127.0.0.1'
    conn = connection_loader.get('mitogen.native.ssh', pc, os.devnull)
    common = '-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes' % world['known_hosts']
    variables = {
        'inventory_hostname': 'h1',
        'ansible_host': '{{ where }}', 'where': '127.0.0.1',   # a template, as reset() sees it
        'ansible_port': world['port'], 'ansible_user': world['user'],
        'ansible_ssh_private_key_file': world['identity_file'],
        'ansible_ssh_common_args': common,
    }
    templated = dict(variables, ansible_host='127.0.0.1')
    return conn, variables, templated


def digest(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def peak_kib(pid='self'):
    """VmHWM: the most resident memory the process ever had."""
    with open('/proc/%s/status' % pid) as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1])


def big(world, where, mib):
    """A sparse file of `mib` MiB with data at both ends, there and back."""
    conn, _, templated = connect(world)
    conn.set_options(var_options=templated)
    src = os.path.join(where, 'big-src')
    with open(src, 'wb') as f:
        f.write(os.urandom(1 << 20))
        f.truncate(mib << 20)
        f.seek(-(1 << 20), os.SEEK_END)
        f.write(os.urandom(1 << 20))
    os.chmod(src, 0o640)
    remote, back = os.path.join(where, 'target', 'big-remote'), os.path.join(where, 'big-back')
    before = peak_kib()
    conn.put_file(src, remote)
    conn.fetch_file(remote, back)
    import mitogen_native.mux
    daemon = mitogen_native.mux.attach()
    try:
        daemon_peak = peak_kib(daemon.daemon_pid)
    finally:
        daemon.detach()
    out = {'size': os.path.getsize(back), 'same': digest(src) == digest(back),
           'remote_mode': oct(os.stat(remote).st_mode & 0o777),
           'grew_kib': peak_kib() - before, 'daemon_peak_kib': daemon_peak}
    conn.close()
    for p in (src, remote, back):
        os.unlink(p)
    print(json.dumps(out))


def main():
    world = json.load(open(sys.argv[1]))
    if sys.argv[2:3] == ['big']:
        return big(world, sys.argv[3], int(sys.argv[4]))
    conn, variables, templated = connect(world)
    out = {'names': sorted(conn.ansible_aliases),
           'matches_ours': conn.matches_name(['mitogen.native.ssh']),
           'matches_builtin': conn.matches_name(['ssh']) or conn.matches_name(['ansible.builtin.ssh'])}
    conn.set_options(var_options=templated)

    def run(cmd, in_data=None):
        try:
            rc, stdout, stderr = conn.exec_command(cmd, in_data=in_data, sudoable=False)
            return {'rc': rc, 'stdout': stdout.decode('latin-1'), 'stderr': stderr.decode('latin-1')}
        except Exception as e:
            return {'error': '%s: %s' % (type(e).__name__, e)}

    out['bytes'] = run("printf 'a\\000b\\377\\n'; printf 'e\\r\\n' >&2; exit 7")
    out['stdin'] = run('cat', in_data=b'\x00\x01 binary stdin\n')
    out['first'] = run('echo $PPID')
    out['again'] = run('echo $PPID')
    out['kill'] = run('kill -9 $PPID')
    out['after_kill'] = run('echo $PPID')
    out['connected_after_kill'] = conn.connected
    # reset() as the top-level process calls it: raw vars, templates inside.
    conn.set_options(var_options=variables)
    conn.reset()
    out['connected_after_reset'] = conn.connected
    conn.set_options(var_options=templated)
    out['after_reset'] = run('echo $PPID')
    conn.close()
    print(json.dumps(out))


if __name__ == '__main__':
    main()
