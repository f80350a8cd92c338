"""Print upstream Mitogen's own boot command and preamble for one context.

Used by test_upstream_peer.cpp so that our master starts an upstream Mitogen 0.3
child exactly as upstream's master would (its first stage, its minified core.py,
its ExternalContext config), then drives it over our router.

usage: upstream_boot.py PYTHON CONTEXT_ID PARENT_ID REMOTE_NAME DEBUG LOG_LEVEL MAX_MESSAGE_SIZE
output: one argv element per line, a line "--preamble--", the preamble in hex.
"""
import binascii
import sys

import mitogen
import mitogen.parent


class _Options(object):
    profiling = False
    unidirectional = False


class _Context(object):
    pass


class _Router(object):
    def get_module_whitelist(self):
        return []

    def get_module_blacklist(self):
        return []


def main(python, context_id, parent_id, remote_name, debug, log_level, max_size):
    mitogen.context_id = int(parent_id)
    mitogen.parent_ids = []
    opts = _Options()
    opts.python_path = python
    opts.remote_name = remote_name
    opts.debug = debug == "1"
    opts.max_message_size = int(max_size)
    conn = object.__new__(mitogen.parent.Connection)
    conn.options = opts
    conn._router = _Router()
    conn.context = _Context()
    conn.context.context_id = int(context_id)
    mitogen.parent.LOG.setLevel(int(log_level))
    argv = conn.get_boot_command()
    preamble = conn.get_preamble()
    out = sys.stdout
    for a in argv:
        assert "\n" not in a
        out.write(a + "\n")
    out.write("--preamble--\n")
    out.write(binascii.hexlify(preamble).decode() + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
