#!/usr/bin/python3
"""Upstream Mitogen's router.ssh (Debian python3-mitogen; it runs the ssh binary)
against the same loopback sshd as bench_ssh, for the same three figures:

  * ssh bootstrap to first call (median of 10, sequential)
  * N ssh contexts started at once from N threads (best of 3)
  * no-op call over ssh (median and p99)

    bench_ssh_upstream.py [--native build/tests/bench/bench_ssh] [--calls 5000] [--parallel 50]

With --native, the C++ bench runs too, on the same sshd, and the ratios are printed
(upstream / native: above 1 means native is faster). Needs root and openssh-server.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "core", "ssh", "sshd_fixture.py")


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, len(v) * p // 100)]


def upstream(info, calls, parallel):
    import mitogen.master

    broker = mitogen.master.Broker()
    router = mitogen.master.Router(broker)
    kw = dict(
        hostname=info["host"], port=info["port"], username=info["user"],
        identity_file=info["identity_file"], check_host_keys="enforce",
        ssh_args=["-o", "UserKnownHostsFile=" + info["known_hosts"]],
        python_path="/usr/bin/python3",
    )
    try:
        boot = []
        for _ in range(10):
            t0 = time.perf_counter()
            c = router.ssh(**kw)
            c.call(os.getpid)
            boot.append((time.perf_counter() - t0) * 1e3)
            c.shutdown(wait=True)

        par = float("inf")
        for _ in range(3):
            got = [None] * parallel
            errors = []

            def one(i):
                try:
                    got[i] = router.ssh(**kw)
                    got[i].call(os.getpid)
                except Exception as e:  # noqa: BLE001 - report, do not hang
                    errors.append(e)

            ts = [threading.Thread(target=one, args=(i,)) for i in range(parallel)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            par = min(par, (time.perf_counter() - t0) * 1e3)
            if errors:
                raise errors[0]
            for c in got:
                c.shutdown(wait=True)

        c = router.ssh(**kw)
        for _ in range(500):
            c.call(os.getpid)
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            c.call(os.getpid)
            lat.append((time.perf_counter() - t0) * 1e6)
    finally:
        broker.shutdown()
        broker.join()
    return {"boot_ms": statistics.median(boot), "parallel": parallel, "parallel_ms": par,
            "call_us": statistics.median(lat), "call_p99_us": pct(lat, 99)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--native", help="path of the bench_ssh binary, to print ratios")
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--parallel", type=int, default=50)
    a = ap.parse_args()
    out = subprocess.run([sys.executable, FIXTURE, "start"], check=True, stdout=subprocess.PIPE).stdout
    info = json.loads(out)
    try:
        up = upstream(info, a.calls, a.parallel)
        print("%-46s %12s" % ("figure (upstream Mitogen 0.3, ssh binary)", "value"))
        print("%-46s %9.1f ms" % ("ssh bootstrap to first call (median of 10)", up["boot_ms"]))
        print("%-46s %9.1f ms" % ("%d ssh contexts at once (best of 3)" % a.parallel, up["parallel_ms"]))
        print("%-46s %9.1f us (p99 %.1f)" % ("no-op call over ssh (median)", up["call_us"], up["call_p99_us"]))
        if a.native:
            env = dict(os.environ, MITOGEN_SSHD_INFO=out.decode())
            res = subprocess.run([a.native, str(a.calls), str(a.parallel)], env=env, check=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode()
            print()
            print("\n".join(l for l in res.splitlines() if not l.startswith("RESULT ")))
            nat = json.loads([l for l in res.splitlines() if l.startswith("RESULT ")][0][7:])
            print()
            print("%-46s %8s %8s %7s" % ("ratio (upstream / native)", "upstream", "native", "x"))
            for key, label, unit in [("boot_ms", "bootstrap to first call", "ms"),
                                     ("parallel_ms", "%d contexts at once" % a.parallel, "ms"),
                                     ("call_us", "no-op call", "us")]:
                print("%-46s %6.1f%s %6.1f%s %6.1fx" % (label, up[key], unit, nat[key], unit, up[key] / nat[key]))
    finally:
        subprocess.run([sys.executable, FIXTURE, "stop", info["dir"]], check=False)


if __name__ == "__main__":
    main()
