#!/usr/bin/python3
"""File transfer throughput: mitogen_native's Context.put_file / get_file against
upstream Mitogen 0.3.3's FileService (Debian's python3-mitogen), on the same
file, the same destinations and (with --ssh) the same loopback sshd.

    PYTHONPATH=build/python /usr/bin/python3 tests/bench/bench_files.py [--ssh] [--runs 3] [--size-mib 1024]

Each implementation and target runs in a fresh /usr/bin/python3 (the script
re-runs itself with --impl), so its controller peak RSS (VmHWM) growth can be
read: before the first transfer (after a small warm-up transfer) and after the
last. Destinations: a directory on the root filesystem (disk) and one in
/dev/shm (tmpfs, which takes the disk out of the figure).

Upstream is driven as ansible_mitogen does: the controller registers the file
with a FileService in a service Pool, and the child pulls it with
``mitogen.service.FileService.get(master_context, path, out_fp)``. Upstream's
child does not fsync; for a like-for-like figure the benchmark's child
function flushes and fsyncs before returning (ours always does).

Needs root for --ssh (the fixture creates a user and starts sshd).
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
FIXTURE = os.path.join(HERE, '..', 'core', 'context', 'ssh', 'sshd_fixture.py')


def hwm_kib():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1])


def upstream_get(context, path, out_path):
    """Runs in an upstream child: pull `path` from the controller's FileService."""
    import mitogen.service
    with open(out_path, 'wb') as f:
        ok, metadata = mitogen.service.FileService.get(context, path, f)
        f.flush()
        os.fsync(f.fileno())
    return ok, metadata['size']


def remote_unlink(path):
    if os.path.exists(path):
        os.unlink(path)


def run_native(a, info):
    import mitogen_native.master
    broker = mitogen_native.master.Broker()
    router = mitogen_native.master.Router(broker)
    try:
        if info:
            ctx = router.ssh(hostname='127.0.0.1', port=info['port'], username=info['user'],
                             identity_file=info['identity_file'],
                             known_hosts_file=info['known_hosts'], connect_timeout=30)
        else:
            ctx = router.local()
        out = os.path.join(a.dest, 'out')
        ctx.put_file(a.warm, out)
        before = hwm_kib()
        put, get = [], []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            ctx.put_file(a.src, out)
            put.append(time.perf_counter() - t0)
            if a.fetch:
                back = os.path.join(a.local_dest, 'back')
                t0 = time.perf_counter()
                ctx.get_file(out, back)
                get.append(time.perf_counter() - t0)
                os.unlink(back)
        after = hwm_kib()
        ctx.call(remote_unlink, out)
        return {'put_s': put, 'get_s': get, 'hwm_growth_kib': after - before}
    finally:
        broker.shutdown()
        broker.join()


def run_upstream(a, info):
    import mitogen.master
    import mitogen.service
    broker = mitogen.master.Broker()
    router = mitogen.master.Router(broker)
    try:
        service = mitogen.service.FileService(router)
        pool = mitogen.service.Pool(router, services=[service], size=2)
        service.register(a.src)
        service.register(a.warm)
        if info:
            ctx = router.ssh(hostname='127.0.0.1', port=info['port'], username=info['user'],
                             identity_file=info['identity_file'], check_host_keys='enforce',
                             ssh_args=['-o', 'UserKnownHostsFile=' + info['known_hosts']],
                             python_path='/usr/bin/python3')
        else:
            ctx = router.local(python_path='/usr/bin/python3')
        me = router.myself()
        out = os.path.join(a.dest, 'out')
        ctx.call(upstream_get, me, a.warm, out)
        before = hwm_kib()
        put = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            ok, size = ctx.call(upstream_get, me, a.src, out)
            put.append(time.perf_counter() - t0)
            assert ok and size == os.path.getsize(a.src), (ok, size)
        after = hwm_kib()
        ctx.call(remote_unlink, out)
        pool.stop()
        return {'put_s': put, 'get_s': [], 'hwm_growth_kib': after - before}
    finally:
        broker.shutdown()
        broker.join()


def child_main(a):
    info = json.loads(a.sshd) if a.sshd else None
    res = (run_native if a.impl == 'native' else run_upstream)(a, info)
    print('RESULT ' + json.dumps(res))


def make_source(path, mib):
    block = bytearray(os.urandom(1 << 20))
    with open(path, 'wb') as f:
        for n in range(mib):
            block[:8] = n.to_bytes(8, 'big')
            f.write(block)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--ssh', action='store_true', help='also over the loopback sshd')
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--size-mib', type=int, default=1024)
    ap.add_argument('--no-upstream', action='store_true')
    ap.add_argument('--only', choices=['local', 'ssh'], help='measure one target only')
    ap.add_argument('--upstream-ssh-mib', type=int,
                    help='file size for upstream over ssh (it moves ~3 MiB/s there; 1 GiB x 3 takes ~20 min)')
    # Internal: one measurement in this fresh process.
    ap.add_argument('--impl')
    ap.add_argument('--src')
    ap.add_argument('--warm')
    ap.add_argument('--dest')
    ap.add_argument('--local-dest')
    ap.add_argument('--fetch', action='store_true')
    ap.add_argument('--sshd')
    a = ap.parse_args()
    if a.impl:
        return child_main(a)

    work = tempfile.mkdtemp(prefix='mitogen-bench-files-', dir='/var/tmp')
    shm = tempfile.mkdtemp(prefix='mitogen-bench-files-', dir='/dev/shm')
    info = None
    try:
        src = os.path.join(work, 'src')
        small_src = os.path.join(work, 'small-src')
        warm = os.path.join(work, 'warm')
        make_source(src, a.size_mib)
        if a.upstream_ssh_mib:
            make_source(small_src, a.upstream_ssh_mib)
            os.chmod(small_src, 0o644)
        make_source(warm, 4)
        os.chmod(work, 0o755)
        os.chmod(shm, 0o755)
        for p in (src, warm):
            os.chmod(p, 0o644)
        targets = [] if a.only == 'ssh' else [('local', None)]
        if a.ssh or a.only == 'ssh':
            out = subprocess.run([sys.executable, FIXTURE, 'start'], check=True,
                                 stdout=subprocess.PIPE).stdout
            info = json.loads(out)
            targets.append(('ssh', out.decode()))
            pw = pwd.getpwnam(info['user'])
        rows = []
        for target, sshd in targets:
            for dest_name, base in (('disk', work), ('tmpfs', shm)):
                dest = tempfile.mkdtemp(dir=base)
                if sshd:
                    os.chown(dest, pw.pw_uid, pw.pw_gid)
                local_dest = tempfile.mkdtemp(dir=base)
                for impl in (['native'] if a.no_upstream else ['native', 'upstream']):
                    mib, this_src = a.size_mib, src
                    if impl == 'upstream' and sshd and a.upstream_ssh_mib:
                        mib, this_src = a.upstream_ssh_mib, small_src
                    cmd = [sys.executable, os.path.abspath(__file__), '--impl', impl, '--src', this_src,
                           '--warm', warm, '--dest', dest, '--local-dest', local_dest,
                           '--runs', str(a.runs)]
                    if impl == 'native':
                        cmd.append('--fetch')
                    if sshd:
                        cmd += ['--sshd', sshd]
                    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       timeout=3600)
                    if p.returncode != 0:
                        print('%s %s %s failed:\n%s' % (impl, target, dest_name, p.stderr[-2000:]))
                        continue
                    res = json.loads([l for l in p.stdout.splitlines() if l.startswith('RESULT ')][0][7:])
                    res['mib'] = mib
                    rows.append((target, dest_name, impl, res))
                    print('%-5s %-5s %-8s put %s MiB/s (median %.0f)%s, controller peak RSS +%.1f MiB' % (
                        target, dest_name, impl,
                        ' '.join('%.0f' % (mib / s) for s in res['put_s']),
                        mib / statistics.median(res['put_s']),
                        ('; get %s MiB/s (median %.0f)' % (' '.join('%.0f' % (mib / s) for s in res['get_s']),
                                                          mib / statistics.median(res['get_s'])))
                        if res['get_s'] else '',
                        res['hwm_growth_kib'] / 1024.0), flush=True)
                shutil.rmtree(dest, ignore_errors=True)
                shutil.rmtree(local_dest, ignore_errors=True)
        print()
        print('| target | destination | implementation | file | controller → context, MiB/s (median of %d) '
              '| context → controller, MiB/s | controller peak RSS growth |' % a.runs)
        print('|---|---|---|---:|---:|---:|---:|')
        for target, dest_name, impl, res in rows:
            print('| %s | %s | %s | %d MiB | %.0f | %s | %.1f MiB |' % (
                target, dest_name, 'mitogen_native' if impl == 'native' else 'upstream 0.3.3 FileService',
                res['mib'], res['mib'] / statistics.median(res['put_s']),
                '%.0f' % (res['mib'] / statistics.median(res['get_s'])) if res['get_s'] else '—',
                res['hwm_growth_kib'] / 1024.0))
    finally:
        if info:
            subprocess.run([sys.executable, FIXTURE, 'stop', info['dir']], check=False)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == '__main__':
    main()
