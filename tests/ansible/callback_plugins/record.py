# A callback that writes every task result and the final stats to the JSON file
# named by $MITOGEN_TEST_RECORD, for the comparisons in tests/ansible/.
from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = '''
    name: record
    type: aggregate
    short_description: write task results and stats to $MITOGEN_TEST_RECORD (tests only)
    description: One JSON document with every result, in order, for tests/ansible.
'''

import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'aggregate'
    CALLBACK_NAME = 'record'
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super(CallbackModule, self).__init__()
        self.results = []

    def _add(self, status, result):
        self.results.append({
            'task': result._task.get_name(),
            'host': result._host.get_name(),
            'status': status,
            'result': result._result,
        })

    def v2_runner_on_ok(self, result):
        self._add('ok', result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._add('failed', result)

    def v2_runner_on_unreachable(self, result):
        self._add('unreachable', result)

    def v2_runner_on_skipped(self, result):
        self._add('skipped', result)

    def v2_playbook_on_stats(self, stats):
        summary = dict((h, stats.summarize(h)) for h in sorted(stats.processed))
        with open(os.environ['MITOGEN_TEST_RECORD'], 'w') as f:
            json.dump({'results': self.results, 'stats': summary}, f, default=str,
                      indent=1, sort_keys=True)
