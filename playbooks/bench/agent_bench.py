#!/usr/bin/python3
"""What a module task costs on the target alone: Ansible's own AnsiballZ
payloads (built with module_common, as a worker builds them) run in a local
agent through ``mitogen_native_target.exec_command``, as the connection
plugin calls it; median (and minimum) wall time of N calls after a warm-up,
the calls GAP seconds apart (a worker does other work between two modules).
Also a plain shell command (``/bin/sh -c 'true'``: Ansible's housekeeping
commands go without a shell, this does not).

    PYTHONPATH=build/python /usr/bin/python3 playbooks/bench/agent_bench.py \\
        [--n 20] [--gap 0.05] [--modules ping,command,stat,file] \\
        [--versions NAME=DIR,NAME=DIR]

--versions compares copies of mitogen_native_target.py: one agent per copy
(DIR first on its PYTHONPATH), the calls taking turns between them, so that
the machine's load hits them alike.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import mitogen_native.master
import mitogen_native_target as target

PY = os.path.realpath(sys.executable)
CMD = "/bin/sh -c '%s && sleep 0'" % PY
SHELL_CMD = "/bin/sh -c 'true && sleep 0'"
MODULES = {
    'ping': {'data': 'pong'},
    'command': {'_raw_params': 'true', '_uses_shell': False},
    'stat': {'path': '/etc/hostname', 'get_checksum': True},
    'file': {'path': '/nonexistent-dir/x', 'state': 'absent'},
}


def ansiballz(name, args):
    from ansible.executor.module_common import modify_module
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import module_loader
    from ansible.template import Templar
    path = module_loader.find_plugin(name, mod_type='.py')
    data, style, _ = modify_module(name, path, dict(args), Templar(DataLoader()),
                                   task_vars={'ansible_python_interpreter': PY},
                                   module_compression='ZIP_DEFLATED')
    return data


def uptime():
    return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=20)
    ap.add_argument('--gap', type=float, default=0.05)
    ap.add_argument('--modules', default=','.join(MODULES))
    ap.add_argument('--versions', default='',
                    help='NAME=DIR,...: compare these copies of mitogen_native_target')
    args = ap.parse_args()
    versions = [v.split('=', 1) for v in args.versions.split(',') if v] or [('tree', None)]
    before = uptime()
    broker = mitogen_native.master.Broker()
    router = mitogen_native.master.Router(broker)
    agents = []
    saved = os.environ.get('PYTHONPATH')
    try:
        for name, directory in versions:
            # A local context inherits the environment: its interpreter
            # imports mitogen_native_target from DIR before anything installed.
            if directory:
                os.environ['PYTHONPATH'] = os.pathsep.join(
                    [directory] + ([saved] if saved else []))
            agents.append((name, router.local(python_path=[PY])))
            if saved is None:
                os.environ.pop('PYTHONPATH', None)
            else:
                os.environ['PYTHONPATH'] = saved
        jobs = [(m, CMD, ansiballz(m, MODULES[m])) for m in args.modules.split(',')]
        jobs.append(('shell command', SHELL_CMD, None))
        rows = []
        for label, cmd, payload in jobs:
            times = dict((name, []) for name, _ in agents)
            for _, ctx in agents:
                for _ in range(3):
                    rc, out, err = ctx.call(target.exec_command, cmd, payload)
                    assert rc == 0, (label, rc, out, err)
            for _ in range(args.n):
                for name, ctx in agents:
                    time.sleep(args.gap)
                    t0 = time.perf_counter()
                    ctx.call(target.exec_command, cmd, payload)
                    times[name].append((time.perf_counter() - t0) * 1000)
            for name, _ in agents:
                rows.append((label, name, statistics.median(times[name]), min(times[name])))
    finally:
        broker.shutdown()
        broker.join()
    print('uptime before: %s' % before)
    print('uptime after:  %s' % uptime())
    print('%d calls each, %.0f ms apart' % (args.n, args.gap * 1000))
    for label, name, med, low in rows:
        print('%-14s %-8s median %6.1f ms  min %6.1f ms' % (label, name, med, low))


if __name__ == '__main__':
    main()
