"""Functions the module-forwarding tests call inside contexts. Local children
import this module from the PYTHONPATH they inherit (conftest.py); ssh children
fetch it from the test process like any module they lack."""
import importlib


def ask(name):
    """Send GET_MODULE for `name` as the agent's importer does, bypassing its
    own checks, and return what the parent answered: (path, has_source,
    pkg_present); path None means refused or not found."""
    import mitogen.core as core
    imp = core._importer
    with imp._lock:
        imp._cache.pop(name, None)
    slot = core._Slot()
    imp.request(name, lambda: core._inbox.deliver(slot, None))
    core._inbox.wait(slot)
    tup = imp.cached(name)[0]
    return tup[2], tup[3] is not None, tup[1]


def import_attr(module, attr):
    """Import `module` here and return its attribute `attr`."""
    return getattr(importlib.import_module(module), attr)


def module_file(module):
    return importlib.import_module(module).__file__
