#!/usr/bin/python3
"""Benchmarks of the multiplexer daemon (docs/benchmarks.md, "Multiplexer daemon").

    bench_mux.py attach [--n 2000] [--ssh]     attach + connect (warm) + detach, per call
                                               (a local stack, or an ssh one to the loopback sshd)
    bench_mux.py memory [--local 100,500] [--ssh 100]
                                               daemon RSS with that many idle contexts

Each run starts a daemon of its own in a private temporary directory and stops it
afterwards. --ssh needs root (the loopback sshd of tests/plugin/servers.py).
Run with PYTHONPATH=<build>/python.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'plugin'))

from mitogen_native import mux  # noqa: E402

LOCAL = [{'method': 'local'}]


class Daemon(object):
    def __init__(self, **settings):
        self.dir = tempfile.mkdtemp(prefix='mux-bench-', dir='/tmp')
        os.chmod(self.dir, 0o700)
        self.socket = os.path.join(self.dir, 'mux.sock')
        self.config = os.path.join(self.dir, 'mux.yaml')
        settings.setdefault('log_file', os.path.join(self.dir, 'mux.log'))
        settings.setdefault('max_contexts', 100000)
        with open(self.config, 'w') as f:
            for k, v in settings.items():
                f.write('%s: %s\n' % (k, v))
        os.environ[mux.SOCKET_ENV] = self.socket
        os.environ['MITOGEN_MUX_CONFIG'] = self.config

    def __enter__(self):
        return self

    def __exit__(self, *_):
        subprocess.run([mux.find_binary(), 'stop', '--socket', self.socket], stdout=subprocess.DEVNULL,
                       timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)


def rss_kib(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def median_us(samples):
    return statistics.median(samples) * 1e6


def bench_attach(n, stack=None):
    stack = stack or LOCAL
    print('stack: %s' % (stack[0]['method'],))
    with Daemon():
        c = mux.attach()
        c.connect(stack)
        c.detach()
        full, full_cpu, attach, connect, detach = [], [], [], [], []
        for _ in range(n):
            c0, t0 = time.process_time(), time.perf_counter()
            client = mux.Client()
            t1 = time.perf_counter()
            client.connect(stack)
            t2 = time.perf_counter()
            client.detach()
            t3, c3 = time.perf_counter(), time.process_time()
            full.append(t3 - t0)
            full_cpu.append(c3 - c0)
            attach.append(t1 - t0)
            connect.append(t2 - t1)
            detach.append(t3 - t2)
        full.sort()
        print('attach + connect (warm) + detach, %d rounds: median %.0f us (p10 %.0f, p90 %.0f), '
              'CPU of this process %.0f us' % (n, median_us(full), full[n // 10] * 1e6, full[9 * n // 10] * 1e6,
                                                median_us(full_cpu)))
        print('  attach %.0f us, connect %.0f us, detach %.0f us (medians)'
              % (median_us(attach), median_us(connect), median_us(detach)))
        # A fresh process each time, as an Ansible worker is (import excluded).
        code = ('import time, sys\nfrom mitogen_native import mux\n'
                'c0, t0 = time.process_time(), time.perf_counter()\n'
                'c = mux.Client()\nc.connect(%r)\nc.detach()\n'
                'print(time.perf_counter() - t0, time.process_time() - c0)\n' % (stack,))
        fresh, fresh_cpu = [], []
        for _ in range(min(n, 100)):
            out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
            wall, cpu = out.stdout.split()
            fresh.append(float(wall))
            fresh_cpu.append(float(cpu))
        print('  in a fresh process (its first attach): median %.0f us, CPU %.0f us, over %d'
              % (median_us(fresh), median_us(fresh_cpu), len(fresh)))
        # Forked from a process that attached once before (as Ansible forks its
        # workers from the strategy's process): the child attaches anew.
        warm = mux.Client()
        warm.connect(stack)
        warm.detach()
        forked, forked_cpu = [], []
        for _ in range(min(n, 200)):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                c0, t0 = time.process_time(), time.perf_counter()
                client = mux.Client()
                client.connect(stack)
                client.detach()
                os.write(w, ('%r %r' % (time.perf_counter() - t0, time.process_time() - c0)).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as f:
                wall, cpu = f.read().split()
            os.waitpid(pid, 0)
            forked.append(float(wall))
            forked_cpu.append(float(cpu))
        print('  in a child forked from a process that attached before (an Ansible worker): median %.0f us, '
              'CPU %.0f us, over %d' % (median_us(forked), median_us(forked_cpu), len(forked)))


def connect_many(client, stacks):
    """Connect every stack, several at once (the daemon connects on its pool)."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(client.connect, stacks))


def bench_memory(kind, counts, sshd=None):
    settings = {'connect_threads': 8} if kind == 'ssh' else {}
    with Daemon(**settings):
        c = mux.attach()
        pid = c.daemon_pid
        base = rss_kib(pid)

        def stack(i):
            py = ['/usr/bin/python3', '-X', 'n%d' % i]  # a distinct stack per context
            if kind == 'local':
                return [{'method': 'local', 'python_path': py}]
            return [{'method': 'ssh', 'hostname': '127.0.0.1', 'port': sshd['port'], 'username': sshd['user'],
                     'identity_file': sshd['identity_file'], 'known_hosts_file': sshd['known_hosts'],
                     'python_path': py, 'connect_timeout': 120}]
        done = 0
        rows = []
        for n in counts:
            t0 = time.monotonic()
            ctxs = connect_many(c, [stack(i) for i in range(done, n)])
            took = time.monotonic() - t0
            done = n
            # Idle: every context answered once, then nothing.
            for ctx in ctxs:
                ctx.call(os.getpid)
            time.sleep(1.0)
            st = c.status()
            assert len(st['contexts']) == n, len(st['contexts'])
            rss = rss_kib(pid)
            rows.append((n, rss))
            print('%s: %d idle contexts: daemon RSS %.1f MiB (%.1f MiB with none): %.0f KiB per context; '
                  'connected in %.1f s' % (kind, n, rss / 1024.0, base / 1024.0, (rss - base) / float(n), took))
        if len(rows) > 1:
            (n0, r0), (n1, r1) = rows[0], rows[-1]
            print('%s: from %d to %d contexts: %.0f KiB per added context' % (kind, n0, n1, (r1 - r0) / float(n1 - n0)))
        c.detach()


def main():
    p = argparse.ArgumentParser()
    p.add_argument('what', choices=['attach', 'memory'])
    p.add_argument('--n', type=int, default=2000)
    p.add_argument('--local', default='100,500')
    p.add_argument('--ssh', default='', help='memory: ssh context counts; attach: any value uses an ssh stack')
    a = p.parse_args()
    if a.what == 'attach':
        if not a.ssh:
            bench_attach(a.n)
            return
        import servers
        with servers.started(servers.SSHD_FIXTURE) as sshd:
            bench_attach(a.n, [{'method': 'ssh', 'hostname': '127.0.0.1', 'port': sshd['port'],
                                'username': sshd['user'], 'identity_file': sshd['identity_file'],
                                'known_hosts_file': sshd['known_hosts']}])
        return
    if a.local:
        bench_memory('local', [int(x) for x in a.local.split(',')])
    if a.ssh:
        import servers
        with servers.started(servers.SSHD_FIXTURE) as sshd:
            bench_memory('ssh', [int(x) for x in a.ssh.split(',')], sshd)


if __name__ == '__main__':
    main()
