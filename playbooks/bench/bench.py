#!/usr/bin/python3
"""Ansible's per-task cost above its own floor, for three ways to reach hosts:

* stock: the `ssh` connection plugin with pipelining and ControlPersist (its
  fastest setting);
* ours: `mitogen.native.ssh` (the multiplexer daemon when installed, else the
  in-process backend; MITOGEN_NATIVE_BACKEND chooses);
* upstream: Mitogen for Ansible (Debian's `ansible-mitogen`, strategy
  `mitogen_linear` with the stock `ssh` settings), when it is installed.

For 1 host and for 10 hosts (a throw-away sshd listening on 127.0.0.1-10,
tests/ansible/ansible_env.py), each configuration runs `work.yml` (22 module
tasks: facts once, file, copy, template, lineinfile, stat, command, shell,
ping, slurp) and `floor.yml` (22 `debug` tasks: no remote work), once to warm
up (stock's ControlPersist masters, our daemon's contexts) and then RUNS
times, the configurations taking turns so that a drift of the machine's speed
hits them alike. Per-task cost = (median work - median floor) / 22.

    PYTHONPATH=build/python /usr/bin/python3 playbooks/bench/bench.py \
        [--runs 5] [--hosts 1,10] [--configs stock,ours,upstream] [--json FILE]

Needs root (sshd, users), openssh-server, ansible-core; `.ci/bench` runs it.
"""
import argparse
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ANSIBLE_ENV = os.path.join(ROOT, 'tests', 'ansible', 'ansible_env.py')
ANSIBLE_PLAYBOOK = '/usr/bin/ansible-playbook'
CONFIGS = ('stock', 'ours', 'upstream')
#: Also available with --configs: ours without warm fork parents (each forked
#: module imports its module_utils itself), without forks at all (a new
#: interpreter per module, as stock), and without the cache of module_utils
#: imports for Ansible's module building (compat.cache_module_deps).
EXTRA_CONFIGS = ('ours-cold', 'ours-nofork', 'ours-nodeps')
#: Ends the multiplexer daemon listening on argv[1], if the package has one.
STOP_MUX = '''import sys
try:
    from mitogen_native import mux
except ImportError:
    sys.exit(0)
try:
    mux.attach(sys.argv[1], start=False).stop()
except Exception:
    pass
'''


def count_tasks(playbook):
    with open(playbook) as f:
        return sum(1 for line in f if line.startswith('    - name: '))


def upstream_available():
    return os.path.exists('/usr/lib/python3/dist-packages/ansible/plugins/strategy/'
                          'mitogen_linear.py')


def loadavg():
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


class Bench(object):
    def __init__(self, world, work_dir, hosts):
        self.world = world
        self.work_dir = work_dir
        self.hosts = hosts
        user = pwd.getpwnam(world['user'])
        self.base = os.path.join(work_dir, 'targets-%d' % hosts)
        os.makedirs(self.base)
        os.chown(self.base, user.pw_uid, user.pw_gid)
        self.cp_dir = tempfile.mkdtemp(prefix='mnbcp')    # short: a socket path
        # Ours: a multiplexer daemon of the benchmark's own (when the package
        # has one): it keeps contexts between runs, as ControlPersist keeps
        # stock's connections, and is stopped at the end.
        self.mux_dir = tempfile.mkdtemp(prefix='mnbmux')
        self.mux_socket = os.path.join(self.mux_dir, 'mux.sock')

    def close(self):
        subprocess.run([sys.executable, '-c', STOP_MUX, self.mux_socket], timeout=60)
        shutil.rmtree(self.cp_dir, ignore_errors=True)
        shutil.rmtree(self.mux_dir, ignore_errors=True)

    def inventory(self, config):
        path = os.path.join(self.work_dir, 'inventory-%s-%d' % (config, self.hosts))
        w = self.world
        lines = ['[bench]']
        for i in range(self.hosts):
            lines.append('b%d ansible_host=%s' % (i + 1, w['addresses'][i]))
        lines += [
            '[bench:vars]',
            'ansible_connection=%s' % ('mitogen.native.ssh' if config.startswith('ours')
                                       else 'ssh'),
            'ansible_port=%d' % w['port'],
            'ansible_user=%s' % w['user'],
            'ansible_ssh_private_key_file=%s' % w['identity_file'],
            "ansible_ssh_common_args='-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes'"
            % w['known_hosts'],
            'ansible_python_interpreter=/usr/bin/python3',
        ]
        if config == 'ours-nofork':
            lines.append('ansible_mitogen_fork_modules=false')
        with open(path, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        return path

    def env(self, config):
        e = dict(os.environ)
        # As on a normal machine: Python caches compiled modules. (Some build
        # sandboxes export PYTHONDONTWRITEBYTECODE; then every worker compiles
        # mitogen_native from source, ~15-20 ms a task, while Ansible's own
        # modules come precompiled from Debian.)
        e.pop('PYTHONDONTWRITEBYTECODE', None)
        e.update({
            'ANSIBLE_COLLECTIONS_PATH': self.world['collections_path'],
            'ANSIBLE_HOST_KEY_CHECKING': 'True',
            'ANSIBLE_RETRY_FILES_ENABLED': 'False',
            'ANSIBLE_NOCOLOR': '1',
            'ANSIBLE_FORKS': str(max(5, self.hosts)),
            'ANSIBLE_CONFIG': os.path.join(self.work_dir, 'no-ansible.cfg'),
            'MITOGEN_MUX_SOCKET': self.mux_socket,
        })
        if config in ('stock', 'upstream'):
            # Stock's fastest: pipelining and a master connection per host
            # that outlives a run (upstream ignores both but gets the same).
            e['ANSIBLE_PIPELINING'] = 'True'
            e['ANSIBLE_SSH_ARGS'] = ('-o ControlMaster=auto -o ControlPersist=60s '
                                     '-o ControlPath=%s/%%C' % self.cp_dir)
        if config == 'upstream':
            e['ANSIBLE_STRATEGY'] = 'mitogen_linear'
        if config == 'ours-cold':
            e['MITOGEN_NATIVE_WARM_MODULES'] = '0'
        if config == 'ours-nodeps':
            e['MITOGEN_NATIVE_MODULE_DEPS'] = '0'
        return e

    def run(self, config, playbook):
        """Seconds one ansible-playbook run took; raises if it failed."""
        argv = [ANSIBLE_PLAYBOOK, '-i', self.inventory(config),
                os.path.join(HERE, playbook), '-e', 'base=%s' % self.base]
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=self.env(config), cwd=HERE, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=900)
        elapsed = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError('%s with %s on %d hosts failed (rc=%d):\n%s'
                               % (playbook, config, self.hosts, p.returncode, p.stdout[-4000:]))
        return elapsed


def measure(world, work_dir, hosts, configs, runs, ntasks):
    bench = Bench(world, work_dir, hosts)
    try:
        return _measure(bench, hosts, configs, runs, ntasks)
    finally:
        bench.close()


def _measure(bench, hosts, configs, runs, ntasks):
    times = dict((c, {'floor': [], 'work': []}) for c in configs)
    first = {}
    failed = {}
    for c in configs:
        try:
            bench.run(c, 'floor.yml')
            first[c] = bench.run(c, 'work.yml')   # the first run, from nothing
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            failed[c] = str(e)
            sys.stderr.write('bench: %s\n' % (e,))
    live = [c for c in configs if c not in failed]
    for r in range(runs):
        for c in live:
            times[c]['floor'].append(bench.run(c, 'floor.yml'))
            times[c]['work'].append(bench.run(c, 'work.yml'))
        sys.stderr.write('bench: %d host(s), round %d/%d done (load %s)\n'
                         % (hosts, r + 1, runs, loadavg()))
    out = {}
    for c in live:
        floor = statistics.median(times[c]['floor'])
        work = statistics.median(times[c]['work'])
        out[c] = {
            'floor_s': floor, 'work_s': work, 'first_work_s': first[c],
            'per_task_ms': (work - floor) * 1000.0 / ntasks,
            'floor_runs': times[c]['floor'], 'work_runs': times[c]['work'],
        }
    for c, why in failed.items():
        out[c] = {'failed': why.splitlines()[0]}
    return out


def table(results, ntasks):
    lines = ['| hosts | configuration | floor (median) | work (median) | per task above floor '
             '| vs stock | first run (work) |',
             '|---:|---|---:|---:|---:|---:|---:|']
    names = {'stock': 'stock ssh, pipelining, ControlPersist',
             'ours': 'mitogen.native.ssh',
             'ours-cold': 'mitogen.native.ssh, no warm fork parents',
             'ours-nofork': 'mitogen.native.ssh, fork_modules=false',
             'ours-nodeps': 'mitogen.native.ssh, no module_utils import cache',
             'upstream': 'upstream Mitogen 0.3.3 (mitogen_linear)'}
    for hosts, by_config in results.items():
        stock = by_config.get('stock', {}).get('per_task_ms')
        for c, r in by_config.items():
            if 'failed' in r:
                lines.append('| %s | %s | failed: %s | | | | |' % (hosts, names[c], r['failed']))
                continue
            ratio = '%.2fx' % (r['per_task_ms'] / stock) if stock else ''
            lines.append('| %s | %s | %.2f s | %.2f s | %.0f ms | %s | %.2f s |' % (
                hosts, names[c], r['floor_s'], r['work_s'], r['per_task_ms'], ratio,
                r['first_work_s']))
    return '\n'.join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--hosts', default='1,10')
    ap.add_argument('--configs', default=','.join(CONFIGS),
                    help='of %s' % ', '.join(CONFIGS + EXTRA_CONFIGS))
    ap.add_argument('--json', help='also write the figures to this file')
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit('bench: needs root (a throw-away sshd and its users)')
    host_counts = [int(h) for h in args.hosts.split(',')]
    configs = [c for c in args.configs.split(',') if c]
    unknown = [c for c in configs if c not in CONFIGS + EXTRA_CONFIGS]
    if unknown:
        sys.exit('bench: unknown configuration %s (known: %s)'
                 % (', '.join(unknown), ', '.join(CONFIGS + EXTRA_CONFIGS)))
    if 'upstream' in configs and not upstream_available():
        sys.stderr.write('bench: upstream Mitogen for Ansible is not installed '
                         '(apt-get install ansible-mitogen): skipped\n')
        configs.remove('upstream')
    ntasks = count_tasks(os.path.join(HERE, 'work.yml'))
    if ntasks != count_tasks(os.path.join(HERE, 'floor.yml')):
        sys.exit('bench: work.yml and floor.yml must have as many tasks')
    d = tempfile.mkdtemp(prefix='mitogen-sshd-bench-')
    before = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    results = {}
    try:
        info = subprocess.run([sys.executable, ANSIBLE_ENV, 'start', d, str(max(host_counts))],
                              check=True, capture_output=True, text=True, timeout=180).stdout
        world = json.loads(info)
        work_dir = os.path.join(d, 'bench')
        os.makedirs(work_dir)
        os.chmod(work_dir, 0o755)
        for hosts in host_counts:
            results[hosts] = measure(world, work_dir, hosts, configs, args.runs, ntasks)
    finally:
        subprocess.run([sys.executable, ANSIBLE_ENV, 'stop', d], timeout=60)
    after = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    backend = os.environ.get('MITOGEN_NATIVE_BACKEND', 'auto')
    if backend == 'auto':
        has_mux = subprocess.run([sys.executable, '-c', 'import mitogen_native.mux'],
                                 capture_output=True).returncode == 0
        backend += ' (%s)' % ('the multiplexer daemon' if has_mux else 'in-process')
    print('%d tasks per playbook, %d measured runs each (median), backend=%s'
          % (ntasks, args.runs, backend))
    print('agents on the targets import mitogen_native_target from %s'
          % (world['target_pythonpath'] or 'where their interpreter finds it (no PYTHONPATH)'))
    print('uptime before: %s' % before)
    print('uptime after:  %s' % after)
    print(table(results, ntasks))
    for hosts, by_config in results.items():
        ours = by_config.get('ours', {}).get('per_task_ms')
        stock = by_config.get('stock', {}).get('per_task_ms')
        if ours is not None and stock:
            print('%d host(s): ours / stock per-task cost = %.2f (target <= 0.3)'
                  % (hosts, ours / stock))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'ntasks': ntasks, 'runs': args.runs, 'backend': backend,
                       'uptime_before': before, 'uptime_after': after,
                       'results': results}, f, indent=1)


if __name__ == '__main__':
    main()
