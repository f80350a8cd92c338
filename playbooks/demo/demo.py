#!/usr/bin/python3
"""The README's demo: playbooks/demo.yml against a throw-away sshd on
127.0.0.1 (loopback.py), with stock Ansible's ssh plugin (pipelining and
ControlPersist, its fastest setting) and with mitogen.native.ssh, then both
wall times and their ratio. Root only; `.ci/demo` runs it after `.ci/setup`.

    /usr/bin/python3 playbooks/demo/demo.py [--runs N]

Each plugin runs the playbook once to warm up (stock: the ssh master
connection; ours: the contexts), then N times, taking turns; the medians are
compared. The mitogen_native package comes from the build tree (BUILD_DIR,
default build/) when it is there, and the collection is installed from
plugin/collection into the demo's own directory, so the demo runs what this
checkout holds. Everything it starts or adds is removed at the end.
"""
import argparse
import glob
import hashlib
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
PLAYBOOKS = os.path.dirname(HERE)
ROOT = os.path.dirname(PLAYBOOKS)
sys.path.insert(0, HERE)
import loopback  # noqa: E402

ANSIBLE_PLAYBOOK = '/usr/bin/ansible-playbook'
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
PLUGINS = (('stock', 'ssh'), ('ours', 'mitogen.native.ssh'))


def install_collection(d):
    out = os.path.join(d, 'dist')
    subprocess.run(['ansible-galaxy', 'collection', 'build', '--force', '--output-path', out,
                    os.path.join(ROOT, 'plugin', 'collection')],
                   check=True, capture_output=True)
    cols = os.path.join(d, 'collections')
    tarball = glob.glob(os.path.join(out, 'mitogen-native-*.tar.gz'))[0]
    # (It warns that the path is not configured: the runs name it.)
    subprocess.run(['ansible-galaxy', 'collection', 'install', '--force', '-p', cols, tarball],
                   check=True, capture_output=True)
    return cols


class Demo(object):
    def __init__(self, d, target, collections):
        self.d = d
        self.target = target
        self.collections = collections
        user = pwd.getpwnam(target['user'])
        self.root = os.path.join(d, 'target')
        os.makedirs(self.root)
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self.cp_dir = os.path.join(d, 'cp')     # ssh's ControlPath: keep it short
        os.mkdir(self.cp_dir, 0o700)
        # Ours: a multiplexer daemon of the demo's own (when the package has
        # one), stopped at the end rather than left to its idle timeout.
        mux_dir = os.path.join(d, 'mux')
        os.mkdir(mux_dir, 0o700)
        self.mux_socket = os.path.join(mux_dir, 'mux.sock')
        self.fetched = {}

    def inventory(self, plugin):
        t = self.target
        path = os.path.join(self.d, 'inventory-%s' % plugin)
        with open(path, 'w') as f:
            f.write('[demo]\nlocalhost-ssh ansible_host=%s\n[demo:vars]\n' % t['host'])
            f.write('ansible_connection=%s\n' % plugin)
            f.write('ansible_port=%d\nansible_user=%s\n' % (t['port'], t['user']))
            f.write('ansible_ssh_private_key_file=%s\n' % t['identity_file'])
            f.write("ansible_ssh_common_args='-o UserKnownHostsFile=%s "
                    "-o StrictHostKeyChecking=yes'\n" % t['known_hosts'])
            f.write('ansible_python_interpreter=/usr/bin/python3\n')
        return path

    def run(self, name, plugin):
        fetch_dir = os.path.join(self.d, 'fetched-' + name)
        shutil.rmtree(fetch_dir, ignore_errors=True)
        env = dict(os.environ)
        # As on a normal machine: Python caches compiled modules. (Some build
        # sandboxes export PYTHONDONTWRITEBYTECODE; then every worker compiles
        # mitogen_native from source, ~15-20 ms a task, while Ansible's own
        # modules come precompiled from Debian.)
        env.pop('PYTHONDONTWRITEBYTECODE', None)
        env.update({
            'ANSIBLE_COLLECTIONS_PATH': self.collections,
            'ANSIBLE_HOST_KEY_CHECKING': 'True',
            'ANSIBLE_RETRY_FILES_ENABLED': 'False',
            'ANSIBLE_CONFIG': os.path.join(self.d, 'no-ansible.cfg'),
        })
        env['MITOGEN_MUX_SOCKET'] = self.mux_socket
        if name == 'stock':
            env['ANSIBLE_PIPELINING'] = 'True'
            env['ANSIBLE_SSH_ARGS'] = ('-o ControlMaster=auto -o ControlPersist=60s '
                                       '-o ControlPath=%s/%%C' % self.cp_dir)
        argv = [ANSIBLE_PLAYBOOK, '-i', self.inventory(plugin),
                os.path.join(PLAYBOOKS, 'demo.yml'),
                '-e', json.dumps({'demo_root': self.root, 'fetch_dir': fetch_dir})]
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=env, cwd=self.d, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=300)
        elapsed = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit('demo: the playbook failed with %s (rc=%d):\n%s'
                             % (plugin, p.returncode, p.stdout[-5000:]))
        self.fetched[name] = dict(
            (os.path.basename(f), hashlib.sha256(open(f, 'rb').read()).hexdigest())
            for f in glob.glob(os.path.join(fetch_dir, '*')))
        return elapsed, p.stdout


def _recap(output):
    lines = output.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith('TASK [summary]'):
            out += [l for l in lines[i + 1:i + 8] if l.strip() and not l.startswith('TASK')]
        if line.startswith('PLAY RECAP'):
            out += lines[i:i + 2]
    return '\n'.join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--runs', type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit('demo: run as root (it starts an sshd and adds a throw-away user)')
    build = os.path.join(ROOT, os.environ.get('BUILD_DIR', 'build'), 'python')
    if os.path.isdir(os.path.join(build, 'mitogen_native')):
        os.environ['PYTHONPATH'] = build + (
            os.pathsep + os.environ['PYTHONPATH'] if os.environ.get('PYTHONPATH') else '')
    d = tempfile.mkdtemp(prefix='mitogen-demo-')
    os.chmod(d, 0o755)
    demo = None
    try:
        print('demo: starting a throw-away sshd on 127.0.0.1 and the user %s' % loopback.USER)
        target = loopback.start(os.path.join(d, 'sshd'))
        collections = install_collection(d)
        demo = Demo(d, target, collections)
        times = dict((name, []) for name, _ in PLUGINS)
        first = {}
        for name, plugin in PLUGINS:
            print('demo: first run with %s ...' % plugin)
            first[name], _ = demo.run(name, plugin)
        last = None
        for r in range(args.runs):
            for name, plugin in PLUGINS:
                elapsed, output = demo.run(name, plugin)
                times[name].append(elapsed)
                if name == 'ours':
                    last = output
            print('demo: round %d/%d: stock %.2f s, ours %.2f s'
                  % (r + 1, args.runs, times['stock'][-1], times['ours'][-1]))
        print()
        print(_recap(last))
        print()
        same = demo.fetched['stock'] == demo.fetched['ours']
        stock, ours = statistics.median(times['stock']), statistics.median(times['ours'])
        print('playbooks/demo.yml, %d tasks against 127.0.0.1 over ssh (median of %d runs '
              'after one warm-up run each):' % (_task_count(), args.runs))
        print('  stock ssh (pipelining, ControlPersist): %6.2f s   (first run %.2f s)'
              % (stock, first['stock']))
        print('  mitogen.native.ssh:                     %6.2f s   (first run %.2f s)'
              % (ours, first['ours']))
        print('  ours / stock: %.2fx   fetched files identical: %s'
              % (ours / stock, 'yes' if same else 'NO'))
        print('  (ours ran with %s)' % _backend())
        with open('/proc/loadavg') as f:
            print('  (load average during the demo: %s)' % ' '.join(f.read().split()[:3]))
        if not same:
            sys.exit(1)
    finally:
        if demo is not None:
            subprocess.run([sys.executable, '-c', STOP_MUX, demo.mux_socket], timeout=60)
        loopback.stop(os.path.join(d, 'sshd'))
        shutil.rmtree(d, ignore_errors=True)


def _backend():
    if os.environ.get('MITOGEN_NATIVE_BACKEND', 'auto') not in ('auto', 'mux'):
        return 'the in-process backend: a new connection for every task'
    if subprocess.run([sys.executable, '-c', 'import mitogen_native.mux'],
                      capture_output=True).returncode == 0:
        return 'the multiplexer daemon: connections kept across tasks and runs'
    return ('the in-process backend: a new connection for every task (this build '
            'has no multiplexer daemon)')


def _task_count():
    with open(os.path.join(PLAYBOOKS, 'demo.yml')) as f:
        return sum(1 for line in f if line.startswith('    - name: '))


if __name__ == '__main__':
    main()
