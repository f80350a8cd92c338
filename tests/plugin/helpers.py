"""Helpers shared by the Python test suites (tests/plugin, tests/files,
tests/mux, tests/ansible): import them from here, never from a conftest.py.
The loopback servers (sshd, become users) are servers.py's."""
import subprocess
import sys
import time


def pid_alive(pid):
    """True if `pid` exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(pred, timeout=20.0, what='condition'):
    """Poll `pred` until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    assert pred(), 'timed out waiting for %s' % what


def run_script(code, timeout=30, **kwargs):
    """Run `code` with /usr/bin/python3 (or whatever runs the tests) in a fresh
    process; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=timeout, **kwargs)
