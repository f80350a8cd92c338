#!/usr/bin/python
# A module that reports where the module_utils it runs with came from, so that
# a run in a fork of a warm fork parent (mitogen_native_target) can be told
# from a run that imported everything itself, without looking at times:
# basic_file is the warm parent's copy when basic.py was not imported again.
# It also reports what must be the same as in a fresh interpreter: the
# package path of `ansible`, that a module_utils file basic does not import
# comes from this payload, what basic bound at import time, and that nothing
# a previous run changed is still there.
import os
import sys

import ansible
import ansible.module_utils.basic as basic
from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(argument_spec=dict(
        mutate=dict(type='bool', default=False),
    ))
    # Not imported by basic: it must come from this payload's zip.
    from ansible.module_utils.common import dict_transformations
    distro = sys.modules.get('distro.distro') or \
        sys.modules.get('ansible.module_utils.distro._distro')
    leaked = getattr(basic, '_warm_probe_leak', None)
    env_leak = os.environ.get('WARM_PROBE_LEAK')
    if module.params['mutate']:
        # What a module may do to the modules it shares with others.
        basic._warm_probe_leak = os.getpid()
        os.environ['WARM_PROBE_LEAK'] = '1'
        sys.modules['ansible.module_utils.common'].__dict__['_warm_probe_leak'] = 1
    module.exit_json(
        changed=False,
        basic_file=basic.__file__,
        extra_file=dict_transformations.__file__,
        module_file=__file__,
        ansible_path=list(ansible.__path__),
        # What basic bound as __main__ at import: the wrapper's program.
        basic_main_is_the_wrapper=hasattr(basic.__main__, '_ansiballz_main'),
        stdout_is_sys_stdout=sys.stdout is sys.__stdout__,
        distro_confdir=getattr(distro, '_UNIXCONFDIR', None),
        leaked=leaked,
        env_leak=env_leak,
        marker=getattr(basic, 'WARM_TEST_MARK', None),
        extra_marker=getattr(dict_transformations, 'WARM_TEST_MARK', None),
        ppid=os.getppid(),
        pid=os.getpid(),
    )


if __name__ == '__main__':
    main()
