"""Run a playbook with the stock ssh plugin or with ours, and compare.

A run writes an inventory (hosts h1..h4 = 127.0.0.1..4 on the test sshd),
runs /usr/bin/ansible-playbook with the `record` callback (every result and
the stats to a JSON file), and returns a :class:`Run`. :func:`normalized`
removes what legitimately differs between two runs (times, temporary names,
the per-run directories, OpenSSH's "Shared connection ... closed." note), so
that what is left must be equal.
"""
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ANSIBLE_PLAYBOOK = '/usr/bin/ansible-playbook'
ADDRESSES = {'h1': '127.0.0.1', 'h2': '127.0.0.2', 'h3': '127.0.0.3', 'h4': '127.0.0.4'}

STOCK = 'ssh'
OURS = 'mitogen.native.ssh'
STOCK_LOCAL = 'local'
OURS_LOCAL = 'mitogen.native.local'


class Run(object):
    def __init__(self, name, connection, rc, stdout, stderr, record, elapsed, base, fetch_dir):
        self.name = name
        self.connection = connection
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.record = record
        self.elapsed = elapsed
        self.base = base           # directory the playbook writes to on the targets
        self.fetch_dir = fetch_dir  # where fetch puts files on the controller

    @property
    def stats(self):
        return self.record['stats']

    def results(self, task=None, host=None):
        return [r for r in self.record['results']
                if (task is None or r['task'] == task) and (host is None or r['host'] == host)]

    def result(self, task, host):
        found = self.results(task, host)
        assert len(found) == 1, '%s: %d results for %r on %s\n%s' % (
            self.connection, len(found), task, host, self.output())
        return found[0]

    def output(self):
        return 'rc=%s\n--- stdout\n%s\n--- stderr\n%s' % (self.rc, self.stdout[-6000:],
                                                         self.stderr[-4000:])


def _inventory(world, path, connection, hosts, host_vars, group_vars):
    lines = ['[targets]']
    for h in hosts:
        hv = {'ansible_host': ADDRESSES.get(h, '127.0.0.1')}
        hv.update(host_vars.get(h, {}))
        lines.append(h + ' ' + ' '.join('%s=%s' % (k, _ini(v)) for k, v in sorted(hv.items())))
    gv = {
        'ansible_connection': connection,
        'ansible_port': world['port'],
        'ansible_user': world['user'],
        'ansible_ssh_private_key_file': world['identity_file'],
        'ansible_ssh_common_args': '-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes'
                                   % world['known_hosts'],
    }
    gv.update(group_vars)
    lines.append('[targets:vars]')
    for k, v in sorted(gv.items()):
        if v is not None:
            lines.append('%s=%s' % (k, _ini(v)))
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def _ini(v):
    v = str(v)
    if any(c in v for c in ' "\'='):
        return "'" + v.replace("'", "\\'") + "'"
    return v


def make_dirs(run_dir):
    """A per-run directory for the targets (writable by the ssh user) and one
    for fetched files."""
    test_user = pwd.getpwnam('mitogen-test')
    base = os.path.join(run_dir, 'target')
    os.makedirs(base)
    os.chown(base, test_user.pw_uid, test_user.pw_gid)
    os.chmod(run_dir, 0o755)
    fetch_dir = os.path.join(run_dir, 'fetched')
    os.makedirs(fetch_dir)
    return base, fetch_dir


def run(world, playbook, connection, hosts=('h1', 'h2', 'h3'), host_vars=None,
        group_vars=None, extra_vars=None, env=None, args=(), name=None, timeout=300,
        cwd=None):
    """Run `playbook` (a file in tests/ansible/playbooks) with `connection`."""
    name = name or '%s-%s' % (os.path.splitext(os.path.basename(playbook))[0],
                              connection.replace('.', '_'))
    run_dir = tempfile.mkdtemp(prefix='mna-%s-' % name, dir=world['runs_dir'])
    base, fetch_dir = make_dirs(run_dir)
    inv = os.path.join(run_dir, 'inventory')
    _inventory(world, inv, connection, hosts, host_vars or {}, group_vars or {})
    record = os.path.join(run_dir, 'record.json')
    e = dict(os.environ)
    e.update({
        'ANSIBLE_COLLECTIONS_PATH': world['collections_path'],
        'ANSIBLE_LIBRARY': os.path.join(HERE, 'library'),
        'ANSIBLE_CALLBACK_PLUGINS': os.path.join(HERE, 'callback_plugins'),
        'ANSIBLE_CALLBACKS_ENABLED': 'record',
        'ANSIBLE_HOST_KEY_CHECKING': 'True',
        'ANSIBLE_RETRY_FILES_ENABLED': 'False',
        'ANSIBLE_NOCOLOR': '1',
        'ANSIBLE_FORCE_COLOR': '0',
        'ANSIBLE_DEPRECATION_WARNINGS': 'False',
        'ANSIBLE_LOCAL_TEMP': os.path.join(run_dir, 'local-tmp'),
        'ANSIBLE_CONFIG': os.path.join(run_dir, 'no-ansible.cfg'),
        'MITOGEN_TEST_RECORD': record,
    })
    if connection == STOCK:
        # What a stock user with pipelining and ControlPersist runs; masters of
        # its own (OpenSSH's socket name must be short), so that no run reuses
        # a connection another run authenticated.
        cp_dir = tempfile.mkdtemp(prefix='cp', dir=world['cp_dir'])
        e['ANSIBLE_PIPELINING'] = 'True'
        e['ANSIBLE_SSH_ARGS'] = ('-o ControlMaster=auto -o ControlPersist=60s '
                                 '-o ControlPath=%s/%%C' % cp_dir)
    e.update(env or {})
    argv = [ANSIBLE_PLAYBOOK, '-i', inv, os.path.join(HERE, 'playbooks', playbook),
            '-e', 'base=%s fetch_dir=%s' % (base, fetch_dir)]
    for k, v in (extra_vars or {}).items():
        argv += ['-e', json.dumps({k: v})]
    argv += list(args)
    t0 = time.time()
    p = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=timeout,
                       cwd=cwd or run_dir, stdin=subprocess.DEVNULL)
    elapsed = time.time() - t0
    try:
        with open(record) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = {'results': [], 'stats': {}}
    r = Run(name, connection, p.returncode, p.stdout, p.stderr, rec, elapsed, base, fetch_dir)
    sys.stderr.write('[%s: %.1f s, rc=%d]\n' % (name, elapsed, p.returncode))
    return r


# ---------------------------------------------------------------------------
# What may differ between two runs that did the same thing.

VOLATILE_KEYS = {'start', 'end', 'delta', 'atime', 'mtime', 'ctime', 'inode', 'dev',
                 'version', 'warnings', 'deprecations',
                 'parent_is_agent'}   # probe: where it ran, asserted on its own
_PATTERNS = [
    (re.compile(r'/home/mitogen-test/\.ansible/tmp/ansible-tmp-[0-9.]+-[0-9]+-[0-9]+'), '<remote-tmp>'),
    (re.compile(r'/root/\.ansible/tmp/ansible-tmp-[0-9.]+-[0-9]+-[0-9]+'), '<remote-tmp>'),
    (re.compile(r'ansible-tmp-[0-9.]+-[0-9]+-[0-9]+'), '<remote-tmp>'),
    (re.compile(r'ansible_(\w+?)_payload_\w+'), r'ansible_\1_payload_X'),
    (re.compile(r'Shared connection to \S+ closed\.\r?\n'), ''),
    (re.compile(r'/tmp/ansible-local-\w+'), '<local-tmp>'),
    (re.compile(r'\bj[0-9]+\.[0-9]+\b'), '<async-job-id>'),
    (re.compile(r'^tmp[a-z0-9_]{8}$'), '<local-tmpfile>'),   # copy content=: _original_basename
]


_SHARED_CONNECTION = re.compile(r'^Shared connection to \S+ closed\.$')


def normalized(obj, run):
    """`obj` with the volatile parts of `run` replaced by placeholders."""
    if isinstance(obj, dict):
        return dict((k, normalized(v, run)) for k, v in obj.items() if k not in VOLATILE_KEYS)
    if isinstance(obj, list):
        # OpenSSH's note as a line of stderr_lines.
        return [normalized(v, run) for v in obj
                if not (isinstance(v, str) and _SHARED_CONNECTION.match(v))]
    if isinstance(obj, str):
        s = obj.replace(run.base, '<base>').replace(run.fetch_dir, '<fetch>')
        s = s.replace(os.path.dirname(run.base), '<run>')
        for pat, rep in _PATTERNS:
            s = pat.sub(rep, s)
        return s
    return obj


def comparable(run, skip_tasks=()):
    """[(task, host, status, normalized result)] in a stable order."""
    out = []
    for r in run.record['results']:
        if r['task'] in skip_tasks:
            continue
        out.append((r['task'], r['host'], r['status'], normalized(r['result'], run)))
    out.sort(key=lambda x: (x[1], x[0]))
    return out


def tree(root, run=None):
    """{relative path: (type, mode, uid, gid, sha256 or link target)} under
    root; with `run`, paths are normalized() (fetch puts the remote path,
    which holds the run's directory, under the destination)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if run is not None:
                rel = normalized(rel, run)
            if os.path.islink(p):
                out[rel] = ('link', None, st.st_uid, st.st_gid, os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ('dir', oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, None)
            else:
                with open(p, 'rb') as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ('file', oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, digest)
    return out


def assert_same(stock, ours, skip_tasks=()):
    """Everything a user could see of the two runs is the same."""
    a, b = comparable(stock, skip_tasks), comparable(ours, skip_tasks)
    assert [x[:3] for x in a] == [x[:3] for x in b], \
        'task outcomes differ\nstock:\n%s\nours:\n%s\n%s' % (
            _lines(a), _lines(b), ours.output())
    for x, y in zip(a, b):
        assert x[3] == y[3], 'result of %r on %s differs:\n%s\nstock: %s\nours:  %s' % (
            x[0], x[1], '\n'.join(_differences(x[3], y[3])),
            json.dumps(x[3], sort_keys=True), json.dumps(y[3], sort_keys=True))
    assert stock.stats == ours.stats, 'stats differ: stock %s ours %s' % (stock.stats, ours.stats)
    for what, s_root, o_root in (('files on the targets', stock.base, ours.base),
                                 ('fetched files', stock.fetch_dir, ours.fetch_dir)):
        s_tree, o_tree = tree(s_root, stock), tree(o_root, ours)
        assert s_tree == o_tree, '%s differ:\n%s' % (what, '\n'.join(_differences(s_tree, o_tree)))


def _differences(a, b, where=''):
    """Lines naming what differs between two JSON-like values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append('  %s%s: stock %r, ours %r' % (where, k, a.get(k, '<missing>'),
                                                        b.get(k, '<missing>')))
            elif a[k] != b[k]:
                out += _differences(a[k], b[k], '%s%s.' % (where, k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                out += _differences(x, y, '%s%d.' % (where, i))
        return out
    return ['  %s: stock %r, ours %r' % (where.rstrip('.'), a, b)]


def _lines(items):
    return '\n'.join('  %s %s %s' % x[:3] for x in items)


def clean(run):
    shutil.rmtree(os.path.dirname(run.base), ignore_errors=True)
