#!/usr/bin/python3
"""A throw-away OpenSSH server on 127.0.0.1 for the SSH tests and benchmarks.

    sshd_fixture.py start [DIR]   -> prints one JSON object (port, user, keys, ...)
    sshd_fixture.py stop DIR

`start` needs root (CI runs as root): it creates the user `mitogen-test` (home,
/bin/bash, a known password) if missing, makes /run/sshd, generates an ed25519 host
key and an ed25519 user key in DIR (a new temp dir by default), writes an
sshd_config that listens on a free loopback port and lets only `mitogen-test` in
(key or password), starts `/usr/sbin/sshd -D` detached and waits until it accepts
connections. `stop` kills that sshd (and every session it serves) and removes DIR.
"""
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

USER = "mitogen-test"
PASSWORD = "mitogen-test-pw-4711"
SSHD = "/usr/sbin/sshd"


def run(*argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def ensure_user():
    try:
        pwd.getpwnam(USER)
    except KeyError:
        run("useradd", "-m", "-s", "/bin/bash", USER)
    # Always (re)set the password: a previous run may have used another one.
    run("chpasswd", input=("%s:%s\n" % (USER, PASSWORD)).encode())


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def keygen(path, comment):
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path)
    with open(path + ".pub") as f:
        return f.read().split()[:2]  # [type, base64]


def fingerprint(pub_path):
    out = run("ssh-keygen", "-l", "-E", "sha256", "-f", pub_path).stdout.decode()
    return out.split()[1]  # "SHA256:..."


def descendants(pid):
    """Every process below `pid` (from /proc), children first listed after parents."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def start(d=None):
    if os.geteuid() != 0:
        sys.exit("sshd_fixture: needs root (to run sshd and create the user %s)" % USER)
    if not os.path.exists(SSHD):
        sys.exit("sshd_fixture: %s missing (apt-get install -y openssh-server)" % SSHD)
    ensure_user()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    d = d or tempfile.mkdtemp(prefix="mitogen-sshd-")
    os.makedirs(d, exist_ok=True)
    # sshd reads AuthorizedKeysFile as the target user: the dir must be searchable.
    os.chmod(d, 0o755)
    host_key = os.path.join(d, "host_ed25519")
    user_key = os.path.join(d, "id_ed25519")
    other_key = os.path.join(d, "other_host_ed25519")
    host_pub = keygen(host_key, "mitogen-test-host")
    user_pub = keygen(user_key, "mitogen-test-user")
    other_pub = keygen(other_key, "not-the-host")
    auth = os.path.join(d, "authorized_keys")
    with open(auth, "w") as f:
        f.write(" ".join(user_pub) + "\n")
    os.chmod(auth, 0o644)
    port = free_port()
    entry = "[127.0.0.1]:%d" % port
    known = os.path.join(d, "known_hosts")
    with open(known, "w") as f:
        f.write("%s %s\n" % (entry, " ".join(host_pub)))
    wrong = os.path.join(d, "wrong_known_hosts")
    with open(wrong, "w") as f:
        f.write("%s %s\n" % (entry, " ".join(other_pub)))
    conf = os.path.join(d, "sshd_config")
    with open(conf, "w") as f:
        f.write("\n".join([
            "ListenAddress 127.0.0.1",
            "Port %d" % port,
            "HostKey %s" % host_key,
            "PidFile %s" % os.path.join(d, "sshd.pid"),
            "AuthorizedKeysFile %s" % auth,
            "AllowUsers %s" % USER,
            "PubkeyAuthentication yes",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin no",
            # The tests open dozens of connections at once; the default (10:30:100)
            # would drop some of the concurrent handshakes.
            "MaxStartups 500",
            "MaxSessions 100",
            "MaxAuthTries 10",
            "PrintMotd no",
            "LogLevel VERBOSE",
            "",
        ]))
    log = os.path.join(d, "sshd.log")
    run(SSHD, "-t", "-f", conf)
    proc = subprocess.Popen([SSHD, "-D", "-f", conf, "-E", log], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    with open(os.path.join(d, "fixture.pid"), "w") as f:
        f.write(str(proc.pid))
    deadline = time.time() + 10
    while True:
        if proc.poll() is not None:
            sys.exit("sshd_fixture: sshd exited: %s" % open(log).read())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit("sshd_fixture: sshd does not listen on %d" % port)
            time.sleep(0.02)
    info = {
        "dir": d, "host": "127.0.0.1", "port": port, "pid": proc.pid,
        "user": USER, "password": PASSWORD,
        "identity_file": user_key, "known_hosts": known, "wrong_known_hosts": wrong,
        "host_fingerprint": fingerprint(host_key + ".pub"),
        "other_fingerprint": fingerprint(other_key + ".pub"),
        "log": log,
    }
    print(json.dumps(info))
    sys.stdout.flush()


def stop(d):
    try:
        with open(os.path.join(d, "fixture.pid")) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        pid = None
    if pid:
        for p in [pid] + descendants(pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    if os.path.basename(d.rstrip("/")).startswith("mitogen-sshd-"):
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "start":
        start(sys.argv[2] if len(sys.argv) > 2 else None)
    elif len(sys.argv) == 3 and sys.argv[1] == "stop":
        stop(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "sessions":
        # Per-connection sshd processes (what a test kills to cut a connection).
        print(" ".join(str(p) for p in descendants(int(sys.argv[2]))))
    else:
        sys.exit(__doc__)
