"""mitogen_native: Mitogen's Python API over a C++ core.

Start with :mod:`mitogen_native.master` (Broker, Router), call into contexts through
:class:`mitogen_native.core.Context`, and let :mod:`mitogen_native.utils` manage the
broker's lifetime. ``import mitogen_native.master`` is all a program needs.
"""
import atexit

from mitogen_native import core  # registers the wire classes with the extension first
from mitogen_native import _native

__version__ = '0.1.0'

#: This program is the master of its contexts (upstream exposes the same flags).
is_master = True
context_id = 0
parent_id = None


def _at_exit():
    # A broker thread is a C++ thread: Python neither waits for it nor stops it.
    # A program that ends (normally or by an uncaught exception) without calling
    # Broker.shutdown() lands here, after its non-daemon threads finished: every
    # context still running is told to exit and is reaped before the process goes.
    _native._shutdown_all()
    # Python threads waiting inside the extension must end before the
    # interpreter finalizes (see _channels._Handlers.stop).
    from mitogen_native import _channels
    _channels._stop_handlers()
    core._log_pump.stop()


atexit.register(_at_exit)
