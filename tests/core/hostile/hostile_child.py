"""A hostile "agent" for the master's robustness tests.

Started by the master in place of the interpreter:
    python3 hostile_child.py SCENARIO -c <stage 1>
It performs the bootstrap dance far enough to be connected, then misbehaves
as SCENARIO says. Standard library only; never trusted by the master.
"""
import os
import pickle
import re
import struct
import sys
import time

HEADER = struct.Struct('>hLLLLLL')
MAGIC = 0x4d49
FORWARD_LOG = 102
CALL_FUNCTION = 101
ADD_ROUTE = 103
DEL_ROUTE = 104
ALLOCATE_ID = 105


def read_exact(n):
    buf = b''
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    return buf


def read_frame():
    hdr = read_exact(HEADER.size)
    magic, dst, src, auth, handle, reply_to, length = HEADER.unpack(hdr)
    return dst, src, auth, handle, reply_to, read_exact(length)


def frame(dst, src, auth, handle, reply_to, data):
    return HEADER.pack(MAGIC, dst, src, auth, handle, reply_to, len(data)) + data


def write(data):
    while data:
        data = data[os.write(1, data):]


def main():
    scenario = sys.argv[1]
    stage1 = sys.argv[sys.argv.index('-c') + 1]
    preamble_len = int(re.search(r'n=(\d+)', stage1).group(1))
    if scenario == 'garbage_before':
        write(b'Welcome to a very chatty login banner\r\nMITO00 almost\n')
    write(b'MITO000\n')
    read_exact(preamble_len)
    _, _, _, handle, _, data = read_frame()
    assert handle == 0
    config = pickle.loads(data)
    me = config['context_id']
    write(b'MITO001\n')

    def reply_to_next_call(payload):
        while True:
            dst, src, auth, handle, reply_to, data = read_frame()
            if handle == CALL_FUNCTION:
                write(frame(0, me, me, reply_to, 0, payload))
                return

    if scenario == 'garbage_after':
        write(b'this is not a frame at all, not even close....')
    elif scenario == 'huge_length':
        write(HEADER.pack(MAGIC, 0, me, me, 1000, 0, 0xffffffff))
    elif scenario == 'truncated':
        read_frame()   # the call
        write(frame(0, me, me, 1000, 0, b'x' * 100)[:60])
        return         # exit: stream ends mid-frame
    elif scenario == 'forbidden_global':
        reply_to_next_call(b'\x80\x02cos\nsystem\nX\x02\x00\x00\x00idq\x85R.')
    elif scenario == 'reduce_trick':
        # _codecs.encode with a non-latin1 encoding argument.
        reply_to_next_call(b'\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf_8\x86R.')
    elif scenario == 'deep_nesting':
        reply_to_next_call(b'\x80\x02' + b']' * 100000 + b'a' * 99999 + b'.')
    elif scenario == 'big_dict':
        reply_to_next_call(pickle.dumps({i: i for i in range(1000000)}, 2))
    elif scenario == 'memo_bomb':
        # l0 = [1]; l(n+1) = [ln, ln]: 2**60 leaves from ~1 KiB.
        payload = b'\x80\x02]K\x01aq\x00'
        for i in range(60):
            payload += (b'](h' + bytes([i]) + b'h' + bytes([i]) + b'eq'
                        + bytes([i + 1]))
        payload += b'.'
        reply_to_next_call(payload)
    elif scenario == 'spoof':
        write(frame(0, me + 100, me + 100, 1000, 0, pickle.dumps('spoofed', 2)))
        write(frame(0, me, 0, 1000, 0, pickle.dumps('spoofed', 2)))
        reply_to_next_call(pickle.dumps('honest', 2))
    elif scenario == 'steal_reply':
        # Answer handles that were never given to us (another context's calls),
        # then our own call honestly.
        while True:
            dst, src, auth, handle, reply_to, data = read_frame()
            if handle == CALL_FUNCTION:
                break
        for h in range(1000, 1200):
            if h != reply_to:
                write(frame(0, me, me, h, 0, pickle.dumps('stolen', 2)))
        write(frame(0, me, me, reply_to, 0, pickle.dumps('honest', 2)))
    elif scenario == 'add_route':
        write(frame(0, me, me, ADD_ROUTE, 0, b'12345:evil'))
        reply_to_next_call(pickle.dumps('honest', 2))
    elif scenario == 'route_abuse':
        # Hoard id blocks, then try to take over the context started before us
        # (the good one) and to delete its route.
        for i in range(200):
            write(frame(0, me, me, ALLOCATE_ID, 0, b'') if i % 2 else
                  frame(0, me, me, ALLOCATE_ID, 5000 + i, b''))
        write(frame(0, me, me, ADD_ROUTE, 0, b'%d:evil' % (me - 1)))
        write(frame(0, me, me, DEL_ROUTE, 0, b'%d' % (me - 1)))
        write(frame(0, me, me, ADD_ROUTE, 0, b'%d:evil' % 2**40))
        reply_to_next_call(pickle.dumps('honest', 2))
    elif scenario == 'log_flood':
        line = frame(0, me, me, FORWARD_LOG, 0, b'flood\x0020\x00' + b'y' * 1000)
        deadline = time.time() + 2
        while time.time() < deadline:
            write(line * 64)
        reply_to_next_call(pickle.dumps('honest', 2))
    elif scenario == 'no_reply':
        pass
    # Stay connected until the master hangs up.
    while True:
        read_frame()


if __name__ == '__main__':
    main()
