#!/usr/bin/python3
"""Users, rules and wrapper scripts for the sudo/su/doas tests.

    become_fixture.py start [DIR]   -> prints one JSON object (users, passwords, wrappers)
    become_fixture.py stop DIR      -> removes DIR (the users and rules stay: idempotent)

`start` needs root (CI runs as root). Root never gets a password prompt from sudo,
su or doas, so the tests first drop to an unprivileged user and escalate from there:

* `mitogen-test` (created by ../ssh/sshd_fixture.py, password known) gets the sudoers
  rule `mitogen-test ALL=(ALL:ALL) ALL` in /etc/sudoers.d/mitogen-test (a rule that
  needs the password) and, when doas is installed, `permit mitogen-test as root` and
  `permit mitogen-test as mitogen-nosudo` in /etc/doas.conf (also with password);
* `mitogen-nosudo` (created here, password known) has no rule at all.

DIR (a new temp dir by default) receives small wrapper scripts used as
sudo_path / su_path / doas_path: `sudo-as-test` runs the real sudo as mitogen-test,
`sudo-as-nosudo` as mitogen-nosudo, `su-as-nosudo` runs su as mitogen-nosudo,
`doas-as-test` / `doas-as-nosudo` likewise; `sudo-hang` prints nothing and sleeps;
`sudo-german` prints a German prompt "Passwort für ...:" on the terminal and, given
the right password, runs the command (a fake sudo); `sudo-custom` does the same with
the prompt "Geheimwort eingeben:", which no default pattern matches.
The wrappers use setpriv, which (unlike `su -c` and `runuser`) keeps the session
and so the controlling terminal the tests want sudo to prompt on.
"""
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'ssh'))
import sshd_fixture  # noqa: E402  (creates mitogen-test with its password)

TEST_USER = sshd_fixture.USER
TEST_PASSWORD = sshd_fixture.PASSWORD
NOSUDO_USER = 'mitogen-nosudo'
NOSUDO_PASSWORD = 'mitogen-nosudo-pw-0815'
SUDOERS = '/etc/sudoers.d/mitogen-test'
SUDOERS_RULE = '%s ALL=(ALL:ALL) ALL\n' % TEST_USER
DOAS_CONF = '/etc/doas.conf'
DOAS_RULES = ['permit %s as root' % TEST_USER, 'permit %s as %s' % (TEST_USER, NOSUDO_USER)]
DOAS_PATH = shutil.which('doas')


def run(*argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def retried(fn, *args):
    """useradd and chpasswd refuse to run while another one holds /etc/shadow's lock
    (the SSH tests' fixture may be setting the same password right now): try again."""
    for attempt in range(20):
        try:
            return fn(*args)
        except subprocess.CalledProcessError:
            if attempt == 19:
                raise
            time.sleep(0.5)


def ensure_users():
    retried(sshd_fixture.ensure_user)
    try:
        pwd.getpwnam(NOSUDO_USER)
    except KeyError:
        retried(run, 'useradd', '-m', '-s', '/bin/bash', NOSUDO_USER)
    retried(lambda: run('chpasswd', input=('%s:%s\n' % (NOSUDO_USER, NOSUDO_PASSWORD)).encode()))


def ensure_sudoers():
    try:
        with open(SUDOERS) as f:
            if f.read() == SUDOERS_RULE:
                return
    except OSError:
        pass
    tmp = SUDOERS + '.tmp'   # sudo ignores names with a dot: never half-read
    with open(tmp, 'w') as f:
        f.write(SUDOERS_RULE)
    os.chmod(tmp, 0o440)
    run('visudo', '-c', '-q', '-f', tmp)
    os.rename(tmp, SUDOERS)


def ensure_doas():
    if not DOAS_PATH:
        return
    try:
        with open(DOAS_CONF) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    missing = [r for r in DOAS_RULES if r not in lines]
    if missing:
        with open(DOAS_CONF, 'a') as f:
            f.write(''.join(r + '\n' for r in missing))
        os.chmod(DOAS_CONF, 0o600)


def setpriv(user):
    return 'exec setpriv --reuid=%s --regid=%s --init-groups --' % (user, user)


def write_script(d, name, body, interpreter='/bin/sh'):
    path = os.path.join(d, name)
    with open(path, 'w') as f:
        f.write('#!' + interpreter + '\n' + body + '\n')
    os.chmod(path, 0o755)
    return path


FAKE_SUDO = r'''
# A fake sudo with a prompt of its own: reads the password from the terminal, runs
# the command after "--" when it is right. Usage: SCRIPT -u USER -- CMD...
import os, sys
args = sys.argv[1:]
cmd = args[args.index('--') + 1:]
tty = os.open('/dev/tty', os.O_RDWR)
os.write(tty, %r)
line = b''
while not line.endswith(b'\n'):
    b = os.read(tty, 1)
    if not b:
        sys.exit('sudo-german: terminal closed')
    line += b
os.write(tty, b'\n')
os.close(tty)
if line.rstrip(b'\n') != %r:
    sys.stderr.write('Entschuldigung, versuchen Sie es noch einmal.\n')
    sys.exit(1)
os.execvp(cmd[0], cmd)
'''


def start(d=None):
    if os.geteuid() != 0:
        sys.exit('become_fixture: needs root (to create users and sudoers rules)')
    ensure_users()
    ensure_sudoers()
    ensure_doas()
    d = d or tempfile.mkdtemp(prefix='mitogen-become-')
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    sudo = shutil.which('sudo') or '/usr/bin/sudo'
    su = shutil.which('su') or '/bin/su'
    info = {
        'dir': d,
        'test_user': TEST_USER, 'test_password': TEST_PASSWORD,
        'test_uid': pwd.getpwnam(TEST_USER).pw_uid,
        'nosudo_user': NOSUDO_USER, 'nosudo_password': NOSUDO_PASSWORD,
        'nosudo_uid': pwd.getpwnam(NOSUDO_USER).pw_uid,
        'sudo_as_test': write_script(d, 'sudo-as-test', '%s %s "$@"' % (setpriv(TEST_USER), sudo)),
        'sudo_as_nosudo': write_script(d, 'sudo-as-nosudo', '%s %s "$@"' % (setpriv(NOSUDO_USER), sudo)),
        'su_as_nosudo': write_script(d, 'su-as-nosudo', '%s %s "$@"' % (setpriv(NOSUDO_USER), su)),
        'sudo_hang': write_script(d, 'sudo-hang', 'exec sleep 3600'),
        'sudo_german': write_script(d, 'sudo-german', FAKE_SUDO % (
            '[sudo] Passwort f\u00fcr mitogen-test: '.encode(), TEST_PASSWORD.encode()), '/usr/bin/python3'),
        # A prompt no default pattern knows: only password_prompts=["geheimwort"] helps.
        'sudo_custom': write_script(d, 'sudo-custom', FAKE_SUDO % (
            b'Geheimwort eingeben: ', TEST_PASSWORD.encode()), '/usr/bin/python3'),
        'doas': DOAS_PATH or '',
    }
    if DOAS_PATH:
        info['doas_as_test'] = write_script(d, 'doas-as-test', '%s %s "$@"' % (setpriv(TEST_USER), DOAS_PATH))
        info['doas_as_nosudo'] = write_script(d, 'doas-as-nosudo', '%s %s "$@"' % (setpriv(NOSUDO_USER), DOAS_PATH))
    print(json.dumps(info))
    sys.stdout.flush()


def stop(d):
    if os.path.basename(d.rstrip('/')).startswith('mitogen-become-'):
        shutil.rmtree(d, ignore_errors=True)


if __name__ == '__main__':
    if len(sys.argv) >= 2 and sys.argv[1] == 'start':
        start(sys.argv[2] if len(sys.argv) > 2 else None)
    elif len(sys.argv) == 3 and sys.argv[1] == 'stop':
        stop(sys.argv[2])
    else:
        sys.exit(__doc__)
