#!/usr/bin/python3
"""Write the fuzzers' seed corpus: tests/fuzz/corpus/{pickle,frame,bootstrap}/.

Run with /usr/bin/python3 after changing the samples; the output is committed. The
pickles are CPython's own (protocol 2 and 3) of the sample values the wire tests use
(tests/core/wire/wire_samples.py), so the fuzzer starts from what real peers send.
Inputs for frame and bootstrap start with the control bytes fuzz_checks.hpp describes.
"""
import os
import pickle
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'core', 'wire'))
from wire_samples import Kwargs, samples  # noqa: E402

MAX_SEED = 4096  # bigger seeds only slow the fuzzer down (and raise its -max_len)


def frame(payload, dst=1, src=0, handle=101, reply_to=1000, auth=None):
    auth = src if auth is None else auth
    return struct.pack('>hLLLLLL', 0x4d49, dst, src, auth, handle, reply_to, len(payload)) + payload


def pickles():
    out = {}
    for name, value in samples():
        for proto in (2, 3):
            data = pickle.dumps(value, protocol=proto)
            if len(data) <= MAX_SEED:
                out['%s-p%d' % (name, proto)] = data
    # Memo references (a list memoized before it is filled) and a pickle with FRAME
    # (protocol 4 framing is refused only by the PROTO check; keep the opcode in play).
    x = [1]
    out['memo-shared-p2'] = pickle.dumps([x, x, {'a': x}], protocol=2)
    out['memo-p4-proto-refused'] = pickle.dumps([1, 'a'], protocol=4)
    return out


def frames(pk):
    call = pickle.dumps((None, 'os', None, 'getpid', (), Kwargs({})), protocol=2)
    reply = pk['int65536-p2']
    dead = frame(b'the context disconnected', dst=0, src=1, handle=1000, reply_to=999)
    log = frame(b'mitogen\x0020\x00hello', dst=0, src=1, handle=102, reply_to=0)
    shutdown = frame(b'', handle=106, reply_to=0)
    # Byte 0: 255 = the default maximum (128 MiB), else 3 * value. Most seeds use 600
    # bytes: a header announcing more than 4 MiB makes the parser reserve 4 MiB, which
    # is correct but slows the fuzzer down.
    default_max, max_600, small_max = b'\xff', b'\xc8', b'\x10'
    one_byte_chunks, mixed_chunks = b'\x00', b'\x2a'
    return {
        'call': default_max + mixed_chunks + frame(call),
        'reply': default_max + one_byte_chunks + frame(reply, dst=0, src=1, handle=1000, reply_to=0),
        'several': max_600 + mixed_chunks + frame(call) + log + dead + shutdown,
        'empty-payload': max_600 + one_byte_chunks + shutdown,
        'partial': max_600 + mixed_chunks + frame(call)[:-3],
        'too-large': small_max + mixed_chunks + frame(b'x' * 60) + frame(call),
        'bad-magic': max_600 + mixed_chunks + shutdown + b'XX' + shutdown[2:],
    }


def bootstraps(fr):
    framed = fr['several'][2:]
    seed_a, seed_b = b'\x00', b'\x77'
    return {
        'clean': seed_a + b'MITO000\nMITO001\n' + framed,
        'noise': seed_b + b'banner from .profile\nMITO00 MITO000MITO000\n' + b'x' * 300 + b'MITO001\n' + framed,
        'split': seed_a + b'MITO0' + b'00\n' + b'MITO00' + b'1\n',
        'out-of-order': seed_b + b'MITO001\nMITO000\nMITO000\nMITO001\nMITO001\n' + framed,
        # Upstream Mitogen's core says MITO002 once its ExternalContext is up.
        'upstream-ec2': seed_b + b'MITO000\nMITO001\nMITO002\n' + framed,
        'ec2-prefix-only': seed_a + b'MITO000\nMITO001\nMITO00',
        'stage1-only': seed_a + b'Python 3.11\nMITO000\nTraceback (most recent call last):\n',
    }


def write(target, items):
    d = os.path.join(HERE, 'corpus', target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for name, data in sorted(items.items()):
        with open(os.path.join(d, name), 'wb') as f:
            f.write(data)
    print('%-10s %3d files' % (target, len(items)))


def main():
    pk = pickles()
    fr = frames(pk)
    write('pickle', pk)
    write('frame', fr)
    write('bootstrap', bootstraps(fr))


if __name__ == '__main__':
    main()
