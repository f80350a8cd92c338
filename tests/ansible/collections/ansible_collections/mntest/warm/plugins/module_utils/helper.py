# A collection's module_utils: a module in a fork of a warm fork parent must
# import it from its own payload.
from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

MARK = 'collection helper v1'


def where():
    return __file__


def read_env():
    return os.environ.get('MNTEST_VALUE')
