"""A small pure-Python master for testing the agent.

It starts an agent exactly as the C++ master does (argv[0] 'mitogen:<name>',
/usr/bin/python3 -c <stage1 with PREAMBLE_LEN substituted>, protocol on a
socketpair or two pipes, stderr on a pipe), feeds it the compressed agent and
the BOOTSTRAP frame, and then speaks frames. It is a test harness: it uses
CPython's pickle, restricted on the decoding side to the wire types.

GET_MODULE requests are answered while the master waits for other frames:
from `modules` (see serve_module()) with LOAD_MODULE, or, for names it does
not serve, with a negative LOAD_MODULE. With `modules` left as None the
master behaves like one without a module responder: it answers the request's
reply handle with a dead message, as the C++ router does.
"""

import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
AGENT_DIR = os.path.join(ROOT, 'core', 'agent')
# The interpreter the agent runs under; override to check other versions.
PYTHON = os.environ.get('MITOGEN_AGENT_PYTHON', '/usr/bin/python3')

HEADER = struct.Struct('>hLLLLLL')
MAGIC = 0x4d49
BOOTSTRAP = 0
GET_MODULE = 100
CALL_FUNCTION = 101
FORWARD_LOG = 102
SHUTDOWN = 106
LOAD_MODULE = 107
IS_DEAD = 999


def stage1_source(preamble_len):
    with open(os.path.join(AGENT_DIR, 'stage1.py')) as f:
        return f.read().rstrip('\n').replace('PREAMBLE_LEN', str(preamble_len))


def agent_source():
    """The agent as it ships: its parts joined by core/agent/build_agent.py,
    the same function the build embeds."""
    if AGENT_DIR not in sys.path:
        sys.path.insert(0, AGENT_DIR)
    import build_agent
    return build_agent.agent_source(AGENT_DIR)


def compressed_agent():
    return zlib.compress(agent_source().encode('utf-8'), 9)


# -- wire values as the test sees them ---------------------------------------

class RemoteError(Exception):
    """A CallError reply (its text is args[0])."""


class DeadReply(Exception):
    """A dead message arrived instead of a reply."""


class Kwargs(dict):
    pass


class Blob(bytes):
    pass


class Secret(str):
    pass


class Context(object):
    def __init__(self, context_id, name):
        self.context_id, self.name = context_id, name


class DEAD(object):
    pass


class _wire(object):
    """A stand-in for a callable that the encoder writes as GLOBAL
    mitogen.core.<name>."""
    def __init__(self, name):
        self.name = name

    def __call__(self, *args):   # save_reduce() insists on a callable
        raise AssertionError('not callable here')


class _Pickler(pickle._Pickler):
    # The pure-Python pickler lets us emit GLOBAL mitogen.core.<name> without
    # a real mitogen.core module in this process.
    def save_wire(self, obj):
        self.write(pickle.GLOBAL + b'mitogen.core\n' +
                   obj.name.encode() + b'\n')
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_wire] = save_wire

    def reducer_override(self, obj):
        t = type(obj)
        if t is Kwargs:
            return (_wire('Kwargs'), (dict(obj),))
        if t is Blob:
            return (_wire('Blob'), (bytes(obj),))
        if t is Secret:
            return (_wire('Secret'), (str(obj),))
        if t is Context:
            return (_wire('_unpickle_context'), (obj.context_id, obj.name))
        return NotImplemented


def encode(obj, protocol=2):
    f = io.BytesIO()
    _Pickler(f, protocol).dump(obj)
    return f.getvalue()


class _Unpickler(pickle.Unpickler):
    GLOBALS = {
        ('mitogen.core', 'Kwargs'): Kwargs,
        ('mitogen.core', 'Blob'): Blob,
        ('mitogen.core', 'Secret'): Secret,
        ('mitogen.core', '_unpickle_call_error'): RemoteError,
        ('mitogen.core', 'CallError'): RemoteError,
        ('mitogen.core', '_unpickle_context'): Context,
        ('mitogen.core', '_DEAD'): DEAD,
        ('_codecs', 'encode'): lambda s, enc: s.encode('latin-1'),
        ('builtins', 'bytes'): bytes,
        ('__builtin__', 'bytes'): bytes,
        ('builtins', 'bytearray'): bytearray,
        ('__builtin__', 'bytearray'): bytearray,
    }

    def find_class(self, module, name):
        try:
            return self.GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError('agent sent forbidden global %s.%s'
                                         % (module, name))


def decode(data):
    return _Unpickler(io.BytesIO(data)).load()


# -- the master --------------------------------------------------------------

class Message(object):
    def __init__(self, dst_id, src_id, auth_id, handle, reply_to, data):
        self.dst_id, self.src_id, self.auth_id = dst_id, src_id, auth_id
        self.handle, self.reply_to, self.data = handle, reply_to, data

    def __repr__(self):
        return 'Message(dst=%d src=%d auth=%d handle=%d reply_to=%d %r)' % (
            self.dst_id, self.src_id, self.auth_id, self.handle,
            self.reply_to, self.data[:80])


class FakeMaster(object):
    """One child context. `logs` collects FORWARD_LOG records as
    (logger_name, levelno, message) tuples. `early_frames` are written right
    after the BOOTSTRAP frame, without waiting for MITO001. `config_extra`
    adds keys to the BOOTSTRAP config."""

    def __init__(self, name='test', context_id=1, debug=False, log_level=20,
                 env=None, use_pipes=False, max_message_size=128 * 1024 * 1024,
                 cwd=None, early_frames=b'', config_extra=None):
        self.context_id = context_id
        self.logs = []
        self.stderr_data = b''
        self._next_handle = 1000
        self._buf = b''
        self._pending = []   # frames read while waiting for another handle
        self.modules = None        # fullname -> LOAD_MODULE tuple
        self.related = {}          # fullname -> names to push before it
        self.module_requests = []  # GET_MODULE messages, in order
        self.answer_modules = True  # False: leave GET_MODULE to the test
        preamble = compressed_agent()
        args = ['mitogen:%s' % name, '-c', stage1_source(len(preamble))]
        if use_pipes:
            child_in, self._wfd = os.pipe()
            self._rfd, child_out = os.pipe()
        else:
            self._sock, child = socket.socketpair()
            self._rfd = self._wfd = self._sock.fileno()
            child_in = child_out = child.fileno()
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(
            args, executable=PYTHON, stdin=child_in, stdout=child_out,
            stderr=subprocess.PIPE, close_fds=True, env=env, cwd=cwd)
        if use_pipes:
            os.close(child_in)
            os.close(child_out)
        else:
            child.close()
        self.pid = self.proc.pid
        self._stderr_thread = threading.Thread(target=self._read_stderr,
                                               daemon=True)
        self._stderr_thread.start()

        self._wait_for(b'MITO000\n')
        config = {
            'context_id': context_id,
            'parent_ids': [0],
            'remote_name': name,
            'debug': debug,
            'log_level': log_level,
            'max_message_size': max_message_size,
        }
        config.update(config_extra or {})
        self.write(preamble)
        self.send(BOOTSTRAP, encode(config))
        self.write(early_frames)   # frames queued before MITO001 arrives
        self._wait_for(b'MITO001\n')
        self.t_ready = time.perf_counter()

    def _read_stderr(self):
        self.stderr_data = self.proc.stderr.read()

    def _read_some(self, timeout):
        import select
        r, _, _ = select.select([self._rfd], [], [], timeout)
        if not r:
            raise TimeoutError('no data from the agent within %ss' % timeout)
        chunk = os.read(self._rfd, 65536)
        if not chunk:
            raise EOFError('agent closed the connection')
        self._buf += chunk

    def _wait_for(self, marker, timeout=10):
        deadline = time.monotonic() + timeout
        while marker not in self._buf:
            self._read_some(max(0, deadline - time.monotonic()))
        self._buf = self._buf[self._buf.index(marker) + len(marker):]

    # -- raw frames --

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self._wfd, view):]

    def send(self, handle, data, reply_to=0, dst_id=None, src_id=0,
             magic=MAGIC, auth_id=None):
        """Write one frame; auth_id defaults to src_id (as a router forwards
        a context's own message)."""
        dst_id = self.context_id if dst_id is None else dst_id
        auth_id = src_id if auth_id is None else auth_id
        self.write(HEADER.pack(magic, dst_id, src_id, auth_id, handle,
                               reply_to, len(data)) + data)

    def recv_frame(self, timeout=10):
        """Next frame of any kind."""
        deadline = time.monotonic() + timeout
        while len(self._buf) < HEADER.size:
            self._read_some(max(0, deadline - time.monotonic()))
        magic, dst, src, auth, handle, reply_to, length = \
            HEADER.unpack_from(self._buf)
        assert magic == MAGIC, 'agent sent bad magic %r' % (magic,)
        while len(self._buf) < HEADER.size + length:
            self._read_some(max(0, deadline - time.monotonic()))
        data = self._buf[HEADER.size:HEADER.size + length]
        self._buf = self._buf[HEADER.size + length:]
        return Message(dst, src, auth, handle, reply_to, data)

    def recv(self, timeout=10, handle=None):
        """Next frame that is not a FORWARD_LOG (those are stored in logs),
        or, given `handle`, the next one for that handle (others are kept
        for later recv() calls)."""
        for i, msg in enumerate(self._pending):
            if handle is None or msg.handle == handle:
                return self._pending.pop(i)
        while True:
            msg = self.recv_frame(timeout)
            if msg.handle == FORWARD_LOG:
                self._store_log(msg)
            elif msg.handle == GET_MODULE and self.answer_modules and \
                    handle != GET_MODULE:
                self._answer_get_module(msg)
            elif handle is None or msg.handle == handle:
                return msg
            else:
                self._pending.append(msg)

    def _store_log(self, msg):
        name, level, text = msg.data.decode('utf-8').split('\0', 2)
        self.logs.append((name, int(level), text))

    def wait_for_log(self, predicate, timeout=5):
        """Read frames until a log record satisfying predicate arrives."""
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.logs:
                if predicate(rec):
                    return rec
            msg = self.recv_frame(max(0, deadline - time.monotonic()))
            if msg.handle == GET_MODULE and self.answer_modules:
                self._answer_get_module(msg)
                continue
            assert msg.handle == FORWARD_LOG, 'unexpected %r' % (msg,)
            self._store_log(msg)

    # -- modules --

    def serve_module(self, fullname, source, submodules=None,
                     path=None, related=()):
        """Serve `source` (text) as `fullname`: a package if `submodules`
        (a list of names) is given. `related` names are pushed, if served,
        before the module itself, as a real master does."""
        if self.modules is None:
            self.modules = {}
        path = path or '/fake/%s.py' % fullname.replace('.', '/')
        self.modules[fullname] = (
            fullname, submodules, path,
            Blob(zlib.compress(source.encode('utf-8'))), list(related))
        self.related[fullname] = list(related)

    def load_module_payload(self, fullname):
        tup = (self.modules or {}).get(fullname)
        return encode(tup or (fullname, None, None, None, ()))

    def send_load_module(self, fullname, payload=None):
        """Send one LOAD_MODULE (the served tuple, or a negative one)."""
        self.send(LOAD_MODULE, payload or self.load_module_payload(fullname))

    def _answer_get_module(self, msg):
        self.module_requests.append(msg)
        fullname = msg.data.decode('utf-8')
        if self.modules is None:
            if msg.reply_to:
                self.send(msg.reply_to, b'no GET_MODULE handler',
                          reply_to=IS_DEAD, dst_id=msg.src_id)
            return
        for name in self.related.get(fullname, ()):
            if name in self.modules:
                self.send_load_module(name)
        self.send_load_module(fullname)

    def requested_names(self):
        return [m.data.decode('utf-8') for m in self.module_requests]

    # -- calls --

    def new_handle(self):
        self._next_handle += 1
        return self._next_handle

    def call_payload(self, module, function, args=(), kwargs=None,
                     class_name=None, chain_id=None):
        return encode((chain_id, module, class_name, function, tuple(args),
                       Kwargs(kwargs or {})))

    def call_raw(self, payload, timeout=10):
        """Send a CALL_FUNCTION payload; return the reply message."""
        handle = self.new_handle()
        self.send(CALL_FUNCTION, payload, reply_to=handle)
        msg = self.recv(timeout, handle)
        assert msg.handle == handle, msg
        assert msg.dst_id == 0 and msg.src_id == self.context_id, msg
        assert msg.auth_id == self.context_id, msg
        return msg

    def result(self, msg):
        if msg.reply_to == IS_DEAD:
            raise DeadReply(msg.data.decode('utf-8'))
        value = decode(msg.data)
        if isinstance(value, RemoteError):
            raise value
        return value

    def call(self, module, function, *args, **kwargs):
        class_name = kwargs.pop('_class', None)
        chain_id = kwargs.pop('_chain', None)
        timeout = kwargs.pop('_timeout', 10)
        payload = self.call_payload(module, function, args, kwargs,
                                    class_name, chain_id)
        return self.result(self.call_raw(payload, timeout))

    def call_no_reply(self, module, function, *args, **kwargs):
        chain_id = kwargs.pop('_chain', None)
        self.send(CALL_FUNCTION,
                  self.call_payload(module, function, args, kwargs,
                                    chain_id=chain_id))

    def shutdown(self):
        self.send(SHUTDOWN, b'')

    def close(self):
        if self._rfd == self._wfd:
            self._sock.close()
        else:
            os.close(self._rfd)
            os.close(self._wfd)
        self._rfd = self._wfd = None

    def wait(self, timeout=5):
        """Exit status of the agent, or raise if it is still running."""
        status = self.proc.wait(timeout)
        self._stderr_thread.join(timeout)
        return status

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._rfd is not None:
            self.close()
        self.proc.stderr.close()
