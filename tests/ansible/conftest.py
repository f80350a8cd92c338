import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CAN_RUN = os.geteuid() == 0 and os.path.exists('/usr/sbin/sshd') and \
    os.path.exists('/usr/bin/ansible-playbook')


@pytest.fixture(scope='session')
def world():
    """The sshd on 127.0.0.1-4, users, sudoers rules and the installed
    collection (ansible_env.py), plus a directory for the runs."""
    if not CAN_RUN:
        pytest.skip('needs root, openssh-server and ansible-core')
    d = tempfile.mkdtemp(prefix='mitogen-sshd-ansible-')
    out = subprocess.run([sys.executable, os.path.join(HERE, 'ansible_env.py'), 'start', d],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    info = json.loads(out)
    info['runs_dir'] = os.path.join(d, 'runs')
    os.makedirs(info['runs_dir'])
    os.chmod(info['runs_dir'], 0o755)
    # OpenSSH's ControlPath must be short (a UNIX socket name).
    info['cp_dir'] = tempfile.mkdtemp(prefix='mnacp')
    try:
        yield info
    finally:
        # The stock runs' ControlPersist masters end with the sshd's sessions.
        subprocess.run([sys.executable, os.path.join(HERE, 'ansible_env.py'), 'stop', d],
                       timeout=60)
        shutil.rmtree(info['cp_dir'], ignore_errors=True)
