#!/usr/bin/python3
"""The world the Ansible comparisons run in (root only, as CI runs):

    ansible_env.py start DIR [N]  -> prints one JSON object (see start())
    ansible_env.py stop DIR

* one throw-away sshd listening on 127.0.0.1 to 127.0.0.4 (or to 127.0.0.N:
  the benchmark's 10 hosts), on one free port,
  letting in `mitogen-test` (tests/core/context/ssh/sshd_fixture.py's user) by key or
  password;
* a known_hosts file with the host key for every address, another with a wrong
  key, and a second user key the server does not know;
* the become users of tests/core/context/become/become_fixture.py (mitogen-test may
  sudo to anyone with its password; mitogen-nosudo has a password, for su),
  plus `mitogen-ansible`, to which mitogen-test may sudo without a password
  (its own sudoers file, so the other tests' rules stay as they are);
* the mitogen.native collection, built with `ansible-galaxy collection build`
  from plugin/collection and installed into DIR/collections;
* when the mitogen_native_target this process imports (PYTHONPATH=<build>/python)
  is not the one the targets' interpreter would import (an installed copy),
  sshd gives the sessions PYTHONPATH=<its directory> (SetEnv), so that the
  agents run the tree's copy.
"""
import glob
import json
import os
import pwd
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'core', 'context', 'ssh'))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'core', 'context', 'become'))
import sshd_fixture  # noqa: E402
import become_fixture  # noqa: E402

ADDRESSES = ['127.0.0.1', '127.0.0.2', '127.0.0.3', '127.0.0.4']
NOPW_USER = 'mitogen-ansible'
# Read after become_fixture's /etc/sudoers.d/mitogen-test (lexical order), so
# that this rule, not the one asking for a password, decides for this user.
NOPW_SUDOERS = '/etc/sudoers.d/mitogen-test-nopasswd'
NOPW_RULE = '%s ALL=(%s) NOPASSWD: ALL\n' % (sshd_fixture.USER, NOPW_USER)
COLLECTION_SRC = os.path.join(ROOT, 'plugin', 'collection')


def run(*argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def free_port(addresses=ADDRESSES):
    """A port free on every address we listen on."""
    for _ in range(50):
        port = sshd_fixture.free_port()
        ok = True
        for a in addresses:
            s = socket.socket()
            try:
                s.bind((a, port))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return port
    raise RuntimeError('no port free on all of %s' % addresses)


def ensure_nopw_user():
    try:
        pwd.getpwnam(NOPW_USER)
    except KeyError:
        become_fixture.retried(run, 'useradd', '-m', '-s', '/bin/bash', NOPW_USER)
    try:
        with open(NOPW_SUDOERS) as f:
            if f.read() == NOPW_RULE:
                return
    except OSError:
        pass
    tmp = NOPW_SUDOERS + '.tmp'
    with open(tmp, 'w') as f:
        f.write(NOPW_RULE)
    os.chmod(tmp, 0o440)
    run('visudo', '-c', '-q', '-f', tmp)
    os.rename(tmp, NOPW_SUDOERS)


def build_collection(d):
    out = os.path.join(d, 'dist')
    os.makedirs(out, exist_ok=True)
    run('ansible-galaxy', 'collection', 'build', '--force', '--output-path', out, COLLECTION_SRC)
    tarball = glob.glob(os.path.join(out, 'mitogen-native-*.tar.gz'))[0]
    cols = os.path.join(d, 'collections')
    run('ansible-galaxy', 'collection', 'install', '--force', '-p', cols, tarball)
    return tarball, cols


TARGET_PYTHONPATH_ENV = 'MITOGEN_TEST_TARGET_PYTHONPATH'
#: Run by the targets' interpreter (sshd's environment, no PYTHONPATH): where
#: it would import mitogen_native_target from, if anywhere.
_WHERE_TARGET = ('import importlib.util, os\n'
                 's = importlib.util.find_spec("mitogen_native_target")\n'
                 'print(os.path.dirname(os.path.realpath(s.origin)) if s and s.origin else "")\n')


def target_module_dir(python=sys.executable):
    """The directory of the mitogen_native_target this process imports (the
    tree under test: PYTHONPATH=<build>/python), if the targets' interpreter,
    started by sshd without that PYTHONPATH, would import another copy (one
    installed by `cmake --install`); else None. An agent imports what is
    installed before it asks the controller for a module, so without
    PYTHONPATH on the targets the tests would run the installed copy.
    $MITOGEN_TEST_TARGET_PYTHONPATH, when set, is the answer ('' for None)."""
    if TARGET_PYTHONPATH_ENV in os.environ:     # '' for none
        return os.environ[TARGET_PYTHONPATH_ENV] or None
    import importlib.util
    spec = importlib.util.find_spec('mitogen_native_target')
    if spec is None or not spec.origin:
        return None
    ours = os.path.dirname(os.path.realpath(spec.origin))
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    theirs = subprocess.run([python, '-c', _WHERE_TARGET], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True).stdout.strip()
    return None if theirs == ours else ours


def start(d, count=len(ADDRESSES)):
    addresses = ['127.0.0.%d' % i for i in range(1, count + 1)]
    if os.geteuid() != 0:
        sys.exit('ansible_env: needs root (sshd, users, sudoers)')
    become_fixture.ensure_users()
    become_fixture.ensure_sudoers()
    ensure_nopw_user()
    os.makedirs('/run/sshd', mode=0o755, exist_ok=True)
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    host_key = os.path.join(d, 'host_ed25519')
    user_key = os.path.join(d, 'id_ed25519')
    other_host_key = os.path.join(d, 'other_host_ed25519')
    stranger_key = os.path.join(d, 'stranger_ed25519')
    host_pub = sshd_fixture.keygen(host_key, 'mitogen-ansible-host')
    user_pub = sshd_fixture.keygen(user_key, 'mitogen-ansible-user')
    other_pub = sshd_fixture.keygen(other_host_key, 'not-the-host')
    sshd_fixture.keygen(stranger_key, 'not-authorized')
    auth = os.path.join(d, 'authorized_keys')
    with open(auth, 'w') as f:
        f.write(' '.join(user_pub) + '\n')
    os.chmod(auth, 0o644)
    port = free_port(addresses)
    known = os.path.join(d, 'known_hosts')
    wrong = os.path.join(d, 'wrong_known_hosts')
    with open(known, 'w') as f, open(wrong, 'w') as g:
        for a in addresses:
            f.write('[%s]:%d %s\n' % (a, port, ' '.join(host_pub)))
            g.write('[%s]:%d %s\n' % (a, port, ' '.join(other_pub)))
    # A copy of the user key that mitogen-test can read: a ProxyJump hop runs
    # the target's ssh on the jump host (here the same machine, as that user).
    user = pwd.getpwnam(sshd_fixture.USER)
    jump_dir = os.path.join(d, 'jump')
    os.makedirs(jump_dir)
    os.chown(jump_dir, user.pw_uid, user.pw_gid)
    os.chmod(jump_dir, 0o700)
    jump_key = os.path.join(jump_dir, 'id_ed25519')
    with open(user_key) as src, open(jump_key, 'w') as dst:
        dst.write(src.read())
    jump_known = os.path.join(jump_dir, 'known_hosts')
    with open(known) as src, open(jump_known, 'w') as dst:
        dst.write(src.read())
    for p in (jump_key, jump_known):
        os.chown(p, user.pw_uid, user.pw_gid)
        os.chmod(p, 0o600)
    # The sessions' environment: the tree's mitogen_native_target first (become
    # contexts still import the installed copy: sudo drops PYTHONPATH).
    target_dir = target_module_dir()
    set_env = ['SetEnv PYTHONPATH=%s' % target_dir] if target_dir else []
    conf = os.path.join(d, 'sshd_config')
    with open(conf, 'w') as f:
        f.write('\n'.join(['ListenAddress %s' % a for a in addresses] + [
            'Port %d' % port,
            'HostKey %s' % host_key,
            'PidFile %s' % os.path.join(d, 'sshd.pid'),
            'AuthorizedKeysFile %s' % auth,
            'AllowUsers %s' % sshd_fixture.USER,
            'PubkeyAuthentication yes',
            'PasswordAuthentication yes',
            'KbdInteractiveAuthentication no',
            'UsePAM no',
            'StrictModes no',
            'PermitRootLogin no',
            'MaxStartups 500',
            'MaxSessions 100',
            'MaxAuthTries 10',
            'PrintMotd no',
            # As Debian's sshd: the stock plugin's file transfers use sftp.
            'Subsystem sftp internal-sftp',
            'LogLevel VERBOSE',
        ] + set_env + ['']))
    log = os.path.join(d, 'sshd.log')
    run(sshd_fixture.SSHD, '-t', '-f', conf)
    proc = subprocess.Popen([sshd_fixture.SSHD, '-D', '-f', conf, '-E', log],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    with open(os.path.join(d, 'fixture.pid'), 'w') as f:
        f.write(str(proc.pid))
    deadline = time.time() + 10
    for a in addresses:
        while True:
            if proc.poll() is not None:
                sys.exit('ansible_env: sshd exited: %s' % open(log).read())
            try:
                socket.create_connection((a, port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit('ansible_env: sshd does not listen on %s:%d' % (a, port))
                time.sleep(0.02)
    tarball, cols = build_collection(d)
    info = {
        'dir': d, 'addresses': addresses, 'port': port, 'pid': proc.pid,
        'user': sshd_fixture.USER, 'password': sshd_fixture.PASSWORD,
        'identity_file': user_key, 'stranger_key': stranger_key,
        'known_hosts': known, 'wrong_known_hosts': wrong,
        'jump_identity_file': jump_key, 'jump_known_hosts': jump_known,
        'host_fingerprint': sshd_fixture.fingerprint(host_key + '.pub'),
        'other_fingerprint': sshd_fixture.fingerprint(other_host_key + '.pub'),
        'nosudo_user': become_fixture.NOSUDO_USER,
        'nosudo_password': become_fixture.NOSUDO_PASSWORD,
        'nopw_user': NOPW_USER,
        'collection_tarball': tarball, 'collections_path': cols,
        'log': log,
        'target_pythonpath': target_dir,
    }
    print(json.dumps(info))
    sys.stdout.flush()


def stop(d):
    sshd_fixture.stop(d)   # kills the sshd and its sessions, removes d if it is a mitogen-sshd-* dir


if __name__ == '__main__':
    if len(sys.argv) in (3, 4) and sys.argv[1] == 'start':
        start(sys.argv[2], *[int(n) for n in sys.argv[3:]])
    elif len(sys.argv) == 3 and sys.argv[1] == 'stop':
        stop(sys.argv[2])
    else:
        sys.exit(__doc__)
