#!/usr/bin/python3
"""The machine's floor for a call: a one-byte ping-pong over two pipes between two
Python processes, the least any cross-process round trip to a Python agent can
cost here. Benchmarks divide their no-op call by it (docs/benchmarks.md).

    pingpong.py [--rounds N] [--cpus A,B] [--json]

--cpus pins the two processes (default 0,1: different CPUs; unpinned, the
scheduler sometimes puts both on one CPU and the floor drops by 5x, which makes
any ratio meaningless). --cpus 0,0 pins both to one CPU: the path's pure CPU
cost, without cross-CPU wake-ups.
"""
import argparse
import json
import os
import statistics
import time


def pingpong(rounds=20000, cpus=(0, 1), warmup=2000):
    """Median and minimum round trip in microseconds."""
    a_r, a_w = os.pipe()   # parent -> child
    b_r, b_w = os.pipe()   # child -> parent
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setaffinity(0, {cpus[1]})
            os.close(a_w)
            os.close(b_r)
            read, write = os.read, os.write
            while read(a_r, 1):
                write(b_w, b'.')
        finally:
            os._exit(0)
    os.close(a_r)
    os.close(b_w)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        read, write, clock = os.read, os.write, time.perf_counter
        for _ in range(warmup):
            write(a_w, b'.')
            read(b_r, 1)
        samples = [0.0] * rounds
        for i in range(rounds):
            t = clock()
            write(a_w, b'.')
            read(b_r, 1)
            samples[i] = clock() - t
    finally:
        os.sched_setaffinity(0, old)
        os.close(a_w)
        os.waitpid(pid, 0)
        os.close(b_r)
    return {'median_us': statistics.median(samples) * 1e6,
            'min_us': min(samples) * 1e6}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=20000)
    p.add_argument('--cpus', default='0,1')
    p.add_argument('--json', action='store_true')
    args = p.parse_args()
    cpus = tuple(int(c) for c in args.cpus.split(','))
    r = pingpong(args.rounds, cpus)
    if args.json:
        print(json.dumps(r))
    else:
        print('pipe ping-pong (CPUs %s): median %.1f us, min %.1f us'
              % (args.cpus, r['median_us'], r['min_us']))


if __name__ == '__main__':
    main()
