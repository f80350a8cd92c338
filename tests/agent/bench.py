"""Measure agent startup and call latency through the Python fake master.

    /usr/bin/python3 tests/agent/bench.py [runs]

Prints, as medians:
  * bare interpreter: spawn -> exit of `/usr/bin/python3 -c pass`
  * bootstrap: spawn -> MITO001 (what the master waits for)
  * first call: spawn -> reply to the first os.getpid call
  * round trip: a no-op call (builtins.int with no arguments, pre-encoded
    payload so the Python master's pickling is not measured), median of 1000
"""

import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_master as fm  # noqa: E402


def bare(runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([fm.PYTHON, '-c', 'pass'])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bootstrap(runs):
    boot, first = [], []
    for _ in range(runs):
        m = fm.FakeMaster()
        m.call('os', 'getpid')
        t1 = time.perf_counter()
        boot.append(m.t_ready - m.t_spawn)
        first.append(t1 - m.t_spawn)
        m.shutdown()
        m.wait()
        m.kill()
    return statistics.median(boot), statistics.median(first)


def round_trip(n):
    m = fm.FakeMaster()
    payload = m.call_payload('builtins', 'int')
    frame = fm.HEADER.pack(fm.MAGIC, 1, 0, 0, fm.CALL_FUNCTION, 1001,
                           len(payload)) + payload
    expect = fm.HEADER.size + len(m.call_raw(payload).data)
    fd = m._wfd
    times = []
    for _ in range(n + 100):
        # Lean loop: blocking read of the whole reply, no frame objects.
        t0 = time.perf_counter()
        os.write(fd, frame)
        got = len(os.read(fd, 65536))
        while got < expect:
            got += len(os.read(fd, 65536))
        times.append(time.perf_counter() - t0)
    times = times[100:]
    m.shutdown()
    m.wait()
    m.kill()
    return statistics.median(times)


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    print('bare interpreter   %6.1f ms' % (bare(runs) * 1e3))
    boot, first = bootstrap(runs)
    print('spawn -> MITO001   %6.1f ms' % (boot * 1e3))
    print('spawn -> 1st reply %6.1f ms' % (first * 1e3))
    print('no-op round trip   %6.1f us' % (round_trip(1000) * 1e6))


if __name__ == '__main__':
    main()
