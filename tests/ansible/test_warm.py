"""Modules in a fork of a warm fork parent (mitogen_native_target): a real
playbook with stock ssh and with ours, compared result by result, and the
evidence that basic.py was imported once per agent, not once per module."""
import importlib.util
import os
import re

import runner
from runner import OURS, STOCK

PROBES = ('warm probe loop', 'warm probe again', 'warm probe changes what it shares',
          'warm probe after the change')


def _daemon_backend():
    """True if ours keeps contexts across tasks (the multiplexer daemon)."""
    if os.environ.get('MITOGEN_NATIVE_BACKEND', 'auto') == 'local':
        return False
    return importlib.util.find_spec('mitogen_native.mux') is not None


def _probe_results(run, host):
    """{task: [warm_probe results]} (a loop's items in order), with the keys
    that differ by design (where basic.py came from, the pids) moved
    out of the results that are compared with stock."""
    out = {}
    for task in PROBES:
        result = run.result(task, host)['result']
        items = result.get('results', [result])
        out[task] = [dict(basic_file=i.pop('basic_file'), ppid=i.pop('ppid'), pid=i.pop('pid'))
                     for i in items]
    return out


HERE = os.path.dirname(os.path.abspath(__file__))


def test_modules_run_warm_and_match_stock(world):
    hosts = ('h1', 'h2')
    # The test collection mntest.warm: a module with collection module_utils.
    env = {'ANSIBLE_COLLECTIONS_PATH': '%s:%s' % (world['collections_path'],
                                                  os.path.join(HERE, 'collections'))}
    stock = runner.run(world, 'warm.yml', STOCK, hosts=hosts, env=env)
    ours = runner.run(world, 'warm.yml', OURS, hosts=hosts, env=env)
    assert stock.rc == 0, stock.output()
    for host in hosts:
        stock_probes = _probe_results(stock, host)
        ours_probes = _probe_results(ours, host)
        # Stock: every module imports basic.py from its own payload.
        for items in stock_probes.values():
            for i in items:
                assert '_payload.zip/ansible/module_utils/basic.py' in i['basic_file'], i
        # Ours: from the warm parent's copy, in a private directory, and every
        # item of the loop (one context) is a child of the same warm parent.
        for items in ours_probes.values():
            for i in items:
                directory, _, rest = i['basic_file'].rpartition('/modlib.zip/')
                assert rest == 'ansible/module_utils/basic.py', i
                assert os.path.basename(directory).startswith('mitogen-warm-'), i
        loop = ours_probes['warm probe loop']
        assert len(set(i['basic_file'] for i in loop)) == 1, loop
        assert len(set(i['ppid'] for i in loop)) == 1, loop
        if _daemon_backend():
            # Contexts outlive a task: later tasks use the same warm parent.
            later = [i for t in PROBES[1:] for i in ours_probes[t]]
            assert set(i['ppid'] for i in later) == {loop[0]['ppid']}, ours_probes
        # A module that changed what it shares left nothing behind.
        after = ours.result('warm probe after the change', host)['result']
        assert after['leaked'] is None and after['env_leak'] is None, after
        # A collection module: basic.py from the warm parent, the collection's
        # module_utils from its own payload.
        coll = ours.result('collection module', host)['result']
        assert '/mitogen-warm-' in coll['basic_file'], coll
        if _daemon_backend():
            assert coll['basic_file'] == loop[0]['basic_file'], coll
        assert '_payload.zip/ansible_collections/mntest/warm/plugins/module_utils/helper.py' \
            in coll['helper_file'], coll
        assert coll['mark'] == 'collection helper v1' and coll['env_value'] == 'from the task'
        for run in (stock, ours):
            # (The payload's temporary name has dots here, which runner's
            # normalization does not cover: checked, then left out.)
            result = run.result('collection module', host)['result']
            result.pop('basic_file')
            assert re.match(r'/tmp/ansible_mntest\.warm\.cprobe_payload_\w+/', result.pop('helper_file'))
    runner.assert_same(stock, ours)
