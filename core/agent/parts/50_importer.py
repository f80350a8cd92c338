# ---------------------------------------------------------------------------
# Importing modules from the parent (GET_MODULE / LOAD_MODULE, protocol.md).
#
# The finder sits at the end of sys.meta_path, so it is asked only after the
# normal machinery failed: standard library and locally installed modules are
# never fetched. It asks the parent with GET_MODULE and waits for LOAD_MODULE
# through the inbox, so the waiting thread reads frames itself if nobody else
# does (the main thread importing inside a call cannot deadlock). Answers,
# negative ones included, are cached for the life of the process, as they
# arrive: the parent pushes a module's related modules before the module
# itself, and those are served from the cache without another round trip.
#
# The cache keeps each answer's payload exactly as received, so that a future
# intermediary (via=) can answer its children's GET_MODULE from it without
# re-encoding: see _Importer.request() and cached().

# Names never worth a round trip: Python 2 or Windows-only modules that stdlib
# code probes for inside try/except ImportError. Matched on the top-level
# name only (upstream's list matches prefixes, which hides 'orgparse' too).
_NEVER_FETCH = frozenset([
    '__builtin__', 'cStringIO', 'thread', 'org', 'java', 'msvcrt', 'nt',
    '_winapi', '_winreg', 'winreg', '_overlapped', '_msi', 'winsound',
])


def _is_str_list(value):
    return (type(value) in (list, tuple) and
            all(type(item) is str for item in value))


def _check_module_tuple(tup):
    """Validate a LOAD_MODULE payload:
    (fullname, pkg_present, path, compressed, related)."""
    if not (type(tup) is tuple and len(tup) == 5 and type(tup[0]) is str):
        raise StreamError('bad LOAD_MODULE payload: expected a 5-tuple '
                          'starting with the module name')
    name, present, path, compressed, related = tup
    if not ((present is None or _is_str_list(present)) and
            (path is None or type(path) is str) and
            (compressed is None or isinstance(compressed, bytes)) and
            _is_str_list(related) and
            ((path is None) == (compressed is None))):
        raise StreamError('bad LOAD_MODULE payload for %r: wrong field types',
                          name)


def _negative(fullname):
    return (fullname, None, None, None, ())


class _Importer(object):
    """A sys.meta_path finder and loader for modules served by the parent."""

    def __init__(self, inbox, whitelist=(), blacklist=()):
        self._inbox = inbox
        self._lock = _thread.allocate_lock()   # guards _cache and _pending
        self._cache = {}      # fullname -> (tuple, payload bytes or None)
        self._pending = {}    # fullname -> (reply handle, [callbacks])
        self._present = {}    # package we loaded -> its submodule names
        # Upstream semantics: prefixes of the dotted name; an empty whitelist
        # allows everything.
        self.whitelist = list(whitelist) or ['']
        self.blacklist = list(blacklist)
        inbox.add_handler(LOAD_MODULE, self._on_load_module)

    def __repr__(self):
        return 'mitogen.core._Importer'

    # -- cache and requests (any thread) --------------------------------------

    def cached(self, fullname):
        """(tuple, payload) for `fullname` if it is cached, else None. The
        payload is the LOAD_MODULE message data as received (None for an
        answer synthesised here), ready to forward to a child as is."""
        return self._cache.get(fullname)

    def request(self, fullname, callback):
        """Make sure `fullname` gets cached, then call callback(). The
        callback runs at once if it already is, else in the reading thread
        when the answer arrives, so it must be quick and never wait. Only one
        GET_MODULE per name is ever in flight."""
        with self._lock:
            if fullname in self._cache:
                send = None
            else:
                pending = self._pending.get(fullname)
                if pending is not None:
                    pending[1].append(callback)
                    return
                send = self._inbox.new_handle()
                self._pending[fullname] = (send, [callback])
                # A dead message on this handle means nobody up there serves
                # modules (a master without a responder): a negative answer.
                self._inbox.add_handler(
                    send, lambda msg: self._on_reply(fullname, msg))
        if send is None:
            callback()
            return
        if _debug_fd is not None:
            _debug_log(DEBUG, 'requesting module %s' % (fullname,))
        # reply_to is ours, not upstream's: upstream masters ignore it and
        # answer on LOAD_MODULE; a router with no GET_MODULE handler answers
        # it with a dead message, so a missing responder cannot hang us.
        _send(parent_id, GET_MODULE, fullname.encode('utf-8'), reply_to=send)

    def get(self, fullname):
        """The answer for `fullname`, asking the parent if needed (blocks)."""
        entry = self._cache.get(fullname)
        if entry is not None:
            return entry[0]
        if self._inbox.is_reader():
            # Only a message handler could get here (it runs on the reading
            # thread); waiting would wait for ourselves.
            raise ImportError('cannot fetch %r from inside a message handler'
                              % (fullname,))
        slot = _Slot()
        self.request(fullname, lambda: self._inbox.deliver(slot, None))
        self._inbox.wait(slot)
        return self._cache[fullname][0]

    def _store(self, tup, payload):
        fullname = tup[0]
        with self._lock:
            self._cache[fullname] = (tup, payload)
            pending = self._pending.pop(fullname, None)
        if pending is not None:
            self._inbox.del_handler(pending[0])
            for callback in pending[1]:
                callback()

    # -- handlers (the reading thread) ----------------------------------------

    def _on_load_module(self, msg):
        if msg.is_dead:
            return
        if not _is_ancestor(msg.auth_id):
            _complain(msg.src_id, 'dropped LOAD_MODULE from context %d: not '
                      'an ancestor', msg.auth_id)
            return
        tup = None
        try:
            tup = _decode(msg.data)
            _check_module_tuple(tup)
        except Exception as e:
            _log(ERROR, 'refused LOAD_MODULE: %s', e)
            if type(tup) is tuple and tup and type(tup[0]) is str:
                self._store(_negative(tup[0]), None)   # release its waiters
            return
        if _debug_fd is not None:
            _debug_log(DEBUG, 'received module %s (%s)' % (
                tup[0], 'absent' if tup[2] is None else tup[2]))
        self._store(tup, msg.data)

    def _on_reply(self, fullname, msg):
        if not _is_ancestor(msg.auth_id):
            return _inbox._refuse(msg, 'handle %d awaits a reply from '
                                  'another context' % msg.handle)
        if msg.is_dead:
            _log(DEBUG, 'GET_MODULE %s refused: %s', fullname,
                 msg.data.decode('utf-8', 'replace'))
            self._store(_negative(fullname), None)

    # -- finder and loader (importlib) ---------------------------------------

    def _refused(self, fullname):
        top = fullname.partition('.')[0]
        return (top in _NEVER_FETCH or
                not any(fullname.startswith(s) for s in self.whitelist) or
                any(fullname.startswith(s) for s in self.blacklist))

    def find_spec(self, fullname, path=None, target=None):
        pkgname, _, leaf = fullname.rpartition('.')
        if pkgname:
            # Only submodules of packages we loaded, and only those the
            # parent listed: anything else is answered without a round trip.
            if leaf not in self._present.get(pkgname, ()):
                return None
            pkg = sys.modules.get(pkgname)
            if getattr(getattr(pkg, '__spec__', None), 'loader',
                       None) is not self:
                return None
        if self._refused(fullname):
            return None
        tup = self.get(fullname)
        if tup[2] is None:
            return None   # importlib raises ModuleNotFoundError as usual
        spec = _module_spec()(fullname, self, origin='master:' + tup[2],
                              is_package=tup[1] is not None)
        if tup[1] is not None:
            self._present[fullname] = tup[1]
        return spec

    def create_module(self, spec):
        return None   # the default module object

    def exec_module(self, module):
        spec = module.__spec__
        source = zlib.decompress(self._cache[spec.name][0][3])
        module.__file__ = spec.origin
        exec(compile(source, spec.origin, 'exec', 0, True), module.__dict__)

    def is_package(self, fullname):
        entry = self._cache.get(fullname)
        return entry is not None and entry[0][1] is not None

    def get_source(self, fullname):
        """Source text, so that linecache shows it in tracebacks."""
        entry = self._cache.get(fullname)
        if entry is None or entry[0][3] is None:
            raise ImportError('no source for %r' % (fullname,))
        return zlib.decompress(entry[0][3]).decode('utf-8', 'replace')

    def import_main(self):
        """Load the master's main script as __main__ and return it.

        As upstream: the master serves its script under the name __main__,
        cut just before its `if __name__ == '__main__':` block, so that the
        script's functions exist here while its main program does not run.
        The module replaces the bootstrap's own __main__ in sys.modules.
        """
        spec = self.find_spec('__main__')
        if spec is None:
            raise ModuleNotFoundError("No module named '__main__': the "
                                      'master serves no main script',
                                      name='__main__')
        module = _bootstrap_module().module_from_spec(spec)
        sys.modules['__main__'] = module
        try:
            self.exec_module(module)
        except BaseException:
            sys.modules['__main__'] = _stage1_main
            raise
        return module


def _bootstrap_module():
    # importlib's core is always loaded in CPython, as _frozen_importlib;
    # importing importlib.machinery would cost a few milliseconds more.
    try:
        import _frozen_importlib
        return _frozen_importlib
    except ImportError:
        import importlib._bootstrap
        return importlib._bootstrap


def _module_spec():
    return _bootstrap_module().ModuleSpec


_importer = None
_stage1_main = None   # the `python -c` module, until __main__ is fetched


