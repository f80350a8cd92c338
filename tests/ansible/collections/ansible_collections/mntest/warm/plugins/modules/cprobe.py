#!/usr/bin/python
# A collection module with collection module_utils (tests/ansible/test_warm.py).
from __future__ import absolute_import, division, print_function
__metaclass__ = type

import ansible.module_utils.basic as basic
from ansible.module_utils.basic import AnsibleModule
from ansible_collections.mntest.warm.plugins.module_utils import helper


def main():
    module = AnsibleModule(argument_spec=dict())
    module.exit_json(changed=False, mark=helper.MARK, helper_file=helper.where(),
                     env_value=helper.read_env(), basic_file=basic.__file__)


if __name__ == '__main__':
    main()
