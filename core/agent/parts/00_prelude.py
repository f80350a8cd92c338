"""mitogen-native agent: the program every child context runs.

The first stage (stage1.py) executes this file as the module ``mitogen.core``
inside a synthetic ``mitogen`` package and calls :func:`_bootstrap`, which
reads the config frame, rewires file descriptors, writes ``MITO001`` and then
serves messages on the main thread until SHUTDOWN or until the parent goes.
docs/protocol.md is the specification; this file is its Python side.

Design notes for readers:

* Latency: the main thread reads frames itself and runs calls inline. Handing
  a message from a reader thread to the main thread would cost more than the
  whole C++ round trip we aim for.
* Startup: every import here is paid on every bootstrap. ``logging`` (~15 ms),
  ``traceback``, ``threading`` and ``re`` are avoided or imported lazily; the
  agent logs through its own tiny ``_log`` function.
* Safety: only the wire types listed in protocol.md may be decoded or encoded.
  Anything else becomes an error reply, never a crash.
* Lifetime: a watcher thread notices the parent hanging up even while a call
  is running, so an agent never outlives its parent.

Compatible with Python 3.6+, standard library only.
"""

import fcntl
import io
import os
import select
import sys
import time
import zlib          # already loaded by stage 1
import _thread
from _struct import Struct   # struct.py only re-exports _struct


def _import_pickle():
    """Import the C pickler, skipping pickle.py (which imports `re`).

    _pickle imports `functools` only to keep `functools.partial`, which it
    needs solely to write objects with keyword-only __getnewargs_ex__ at
    protocol < 4: never a wire value. Importing functools costs ~4 ms
    (collections, operator, ...), a fifth of our startup budget, so a
    stand-in is registered while _pickle initialises. This runs while the
    module executes during bootstrap, before any other thread exists; if a
    Python version needs more of functools, we import it for real instead.
    """
    if 'functools' not in sys.modules:
        stand_in = type(sys)('functools')
        stand_in.partial = None
        sys.modules['functools'] = stand_in
        try:
            import _pickle
            return _pickle
        except Exception:
            pass
        finally:
            del sys.modules['functools']
    try:
        import _pickle
        return _pickle
    except ImportError:   # not CPython
        import pickle
        return pickle


_pickle_mod = _import_pickle()


# ---------------------------------------------------------------------------
# Protocol constants (docs/protocol.md).

HEADER_MAGIC = 0x4d49
BOOTSTRAP = 0
GET_MODULE = 100
CALL_FUNCTION = 101
FORWARD_LOG = 102
ADD_ROUTE = 103
DEL_ROUTE = 104
ALLOCATE_ID = 105
SHUTDOWN = 106
LOAD_MODULE = 107
IS_DEAD = 999
FIRST_DYNAMIC_HANDLE = 1000
DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024

_HEADER = Struct('>hLLLLLL')
_HEADER_LEN = _HEADER.size              # 26
_PICKLE_PROTOCOL = 3                    # BINBYTES for bytes; see protocol.md
_MAX_DEPTH = 100                        # the C++ decoder's nesting limit
_READ_SIZE = 65536
_PRIVATE_FD_MIN = 100                   # protocol fds live at or above this
_CALL_ERROR_MAX = 9999                  # upstream refuses longer CallErrors

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_LEVEL_NAMES = {DEBUG: 'DEBUG', INFO: 'INFO', WARNING: 'WARNING',
                ERROR: 'ERROR'}

# Filled in by _bootstrap() from the config frame. Upstream exposes the same
# values as attributes of the `mitogen` package, which _bootstrap() also sets.
context_id = None
parent_id = None
parent_ids = []


