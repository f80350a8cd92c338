#!/usr/bin/python3
"""Channel throughput: a remote loop sends N small items through a Sender to a
Receiver in the controller; mitogen_native against upstream Mitogen.

    PYTHONPATH=build/python /usr/bin/python3 tests/bench/bench_channels.py [-n 100000]

Each implementation runs in a fresh interpreter (this script with --impl), one
after the other. The clock runs from call_async() to the last item received,
so it includes the call's start-up (a few ms).
"""
import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ('mitogen_native', 'mitogen')


def measure(impl, n, rounds):
    sys.path.insert(0, HERE)
    master = importlib.import_module(impl + '.master')
    core = importlib.import_module(impl + '.core')
    import channel_stream
    broker = master.Broker()
    router = master.Router(broker)
    try:
        ctx = router.local()
        rates = []
        for _ in range(rounds):
            recv = core.Receiver(router)
            t = time.perf_counter()
            call = ctx.call_async(channel_stream.stream, recv.to_sender(), n)
            count = 0
            for msg in recv:
                assert msg.unpickle() == count
                count += 1
            elapsed = time.perf_counter() - t
            assert count == n
            call.get()
            rates.append(n / elapsed)
        return {'median': statistics.median(rates), 'best': max(rates)}
    finally:
        broker.shutdown()
        broker.join()


def main():
    p = argparse.ArgumentParser()
    p.add_argument('-n', type=int, default=100000)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--impl', choices=IMPLS)
    a = p.parse_args()
    if a.impl:
        print(json.dumps(measure(a.impl, a.n, a.rounds)))
        return
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([HERE] + [x for x in env.get('PYTHONPATH', '').split(os.pathsep) if x])
    res = {}
    for impl in IMPLS:
        out = subprocess.run([sys.executable, __file__, '--impl', impl, '-n', str(a.n),
                              '--rounds', str(a.rounds)], env=env, capture_output=True, text=True,
                             timeout=600)
        if out.returncode:
            sys.exit('%s failed:\n%s' % (impl, out.stderr))
        res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    print('%d items, median of %d rounds (best)' % (a.n, a.rounds))
    for impl in IMPLS:
        print('  %-15s %9.0f items/s (%.0f)' % (impl, res[impl]['median'], res[impl]['best']))
    print('  ours / upstream: %.1fx' % (res['mitogen_native']['median'] / res['mitogen']['median']))


if __name__ == '__main__':
    main()
