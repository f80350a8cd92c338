"""Cross-check helper run by test_cpython.cpp.

  crosscheck.py dump        print "name hex(protocol 2) hex(protocol 3) expect" per sample,
                            where expect is what our encoder should write (CPython's
                            protocol 2 minus memo opcodes), or "-" where the encodings
                            differ by design (bytes) or need the memo (shared references)
  crosscheck.py load FILE   FILE has "name hex" lines (C++ encodings); print "name ok" or
                            "name FAIL <why>" after restricted-loading and comparing
"""
import os
import pickle
import pickletools
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire_samples  # noqa: E402


_MEMO_OPS = {'PUT', 'BINPUT', 'LONG_BINPUT', 'MEMOIZE', 'GET', 'BINGET', 'LONG_BINGET'}
_BYTES_GLOBALS = {'_codecs encode', '__builtin__ bytes', '__builtin__ bytearray'}


def expected_encoding(v):
    data = pickletools.optimize(pickle.dumps(v, protocol=2))
    for op, arg, _ in pickletools.genops(data):
        if op.name in _MEMO_OPS or (op.name == 'GLOBAL' and arg in _BYTES_GLOBALS):
            return '-'
    return data.hex()


def main():
    table = dict(wire_samples.samples())
    if sys.argv[1] == 'dump':
        for name, v in wire_samples.samples():
            print(name, pickle.dumps(v, protocol=2).hex(), pickle.dumps(v, protocol=3).hex(),
                  expected_encoding(v))
    elif sys.argv[1] == 'load':
        with open(sys.argv[2]) as f:
            for line in f:
                name, hexdata = line.split()
                try:
                    got = wire_samples.restricted_loads(bytes.fromhex(hexdata))
                except Exception as e:  # report, don't stop: one line per case
                    print(name, 'FAIL', type(e).__name__, str(e)[:200].replace('\n', ' '))
                    continue
                if name in table and wire_samples.same(got, table[name]):
                    print(name, 'ok')
                else:
                    print(name, 'FAIL', repr(got)[:200])
    sys.stdout.flush()


if __name__ == '__main__':
    main()
