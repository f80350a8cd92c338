class _FrameReader(object):
    """Frames from a child's stream (a thread of its own: may block)."""

    def __init__(self, fd, buf, max_message_size):
        self.fd = fd
        self.buf = bytearray(buf)
        self.max_message_size = max_message_size

    def _take(self, n):
        buf = self.buf
        while len(buf) < n:
            chunk = os.read(self.fd, max(_READ_SIZE, n - len(buf)))
            if not chunk:
                return None
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def read(self):
        """The next Message, or None at EOF. Raises StreamError when framing
        is lost."""
        header = self._take(_HEADER_LEN)
        if header is None:
            return None
        (magic, dst_id, src_id, auth_id, handle, reply_to,
         length) = _HEADER.unpack(header)
        if magic != HEADER_MAGIC:
            raise StreamError('bad frame magic 0x%04x', magic & 0xffff)
        if length > self.max_message_size:
            raise StreamError('frame of %d bytes exceeds max_message_size',
                              length)
        data = self._take(length)
        if data is None:
            return None
        return Message(dst_id, src_id, auth_id, handle, reply_to, data)


def _child_reader(child, leftover):
    reader = _FrameReader(child.rfd, leftover, _inbox.max_message_size)
    reason = 'its stream closed'
    try:
        while True:
            msg = reader.read()
            if msg is None:
                break
            if _debug_fd is not None:
                _debug_log(DEBUG, 'from child %d: %r' % (child.id, msg))
            _on_child_message(child, msg)
    except BaseException as e:
        reason = str(e)
        _log(ERROR, 'context %d (%s): %s; disconnecting it', child.id,
             child.name, reason)
    finally:
        try:
            _child_gone(child, reason)
        except BaseException as e:
            _log(ERROR, 'cleaning up context %d failed: %r', child.id, e)


def _drain_stderr(fd, name):
    """Forward what a child (or its ssh client) writes on stderr after
    bootstrap, line by line."""
    pending = b''
    try:
        while True:
            chunk = os.read(fd, _READ_SIZE)
            if not chunk:
                break
            lines = (pending + chunk).split(b'\n')
            pending = lines.pop()[-_READ_SIZE:]
            for line in lines:
                _log(WARNING, '[%s] stderr: %s', name,
                     line.decode('utf-8', 'replace'))
    except OSError:
        pass
    finally:
        os.close(fd)


# -- module forwarding ---------------------------------------------------------

def _serve_module(child, msg):
    """GET_MODULE from a descendant: answer from our importer's cache, asking
    our parent (once per name, whoever else waits for it) if it is not there.
    Before the answer, send the related modules we have cached that this
    descendant was not sent yet (as the master does)."""
    try:
        fullname = msg.data.decode('ascii')
        if not (0 < len(fullname) <= 512 and
                all(part.isidentifier() for part in fullname.split('.'))):
            raise ValueError(fullname)
    except (UnicodeError, ValueError):
        _dead_to_child(child, msg, 'bad GET_MODULE name')
        return
    target = msg.src_id

    def answer():
        entry = _importer.cached(fullname)
        sent = child.sent.setdefault(target, set())
        tup, payload = entry
        top = fullname.partition('.')[0]
        for rel in tup[4] if tup[2] is not None else ():
            if rel in sent:
                continue
            rel_entry = _importer.cached(rel)
            if rel_entry is None or rel_entry[0][2] is None:
                continue
            if rel.partition('.')[0] != top and \
                    rel.partition('.')[0] not in sent:
                continue
            sent.add(rel)
            child.send(target, LOAD_MODULE,
                       rel_entry[1] or _encode(rel_entry[0]))
        sent.add(fullname)
        child.send(target, LOAD_MODULE, payload or _encode(tup))

    _importer.request(fullname, answer)


# -- starting children -----------------------------------------------------------

def _sh_quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def _popen(argv, argv0=None):
    import subprocess
    executable = argv[0]
    if argv0 is not None:
        argv = [argv0] + list(argv[1:])
    return subprocess.Popen(
        argv, executable=executable, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
        start_new_session=True)


def _spawn_local(options, stage1, remote_name):
    """Method 'local': a Python interpreter on this host."""
    python = options.get('python_path') or [sys.executable or
                                            '/usr/bin/python3']
    if isinstance(python, str):
        python = [python]
    proc = _popen(list(python) + ['-c', stage1], 'mitogen:' + remote_name)
    return proc, 'local.%d' % (proc.pid,)


def _spawn_ssh(options, stage1, remote_name):
    """Method 'ssh': the system ssh client, as the master's openssh
    transport runs it (docs/ssh.md)."""
    import binascii
    host = options.get('hostname')
    if not host:
        raise _BootError('spawn_failed', 'ssh needs a hostname')
    if options.get('password'):
        raise _BootError('spawn_failed', 'password authentication is not '
                         'available via=: use keys or an agent')
    argv = [options.get('ssh_path') or 'ssh',
            '-o', 'LogLevel=ERROR', '-o', 'BatchMode=yes']

    def opt(kv):
        argv.extend(('-o', kv))
    if options.get('ssh_config_file') is not None:
        argv.extend(('-F', options['ssh_config_file'] or '/dev/null'))
    if options.get('username'):
        argv.extend(('-l', options['username']))
    port = options.get('port')
    if port:
        argv.extend(('-p', str(int(port))))
    for key in options.get('identity_files') or ():
        argv.extend(('-i', key))
    if options.get('identity_files'):
        opt('IdentitiesOnly=yes')
    if options.get('use_agent') is False:
        opt('IdentityAgent=none')
    policy = options.get('check_host_keys') or 'enforce'
    if policy == 'ignore':
        opt('StrictHostKeyChecking=no')
        opt('UserKnownHostsFile=/dev/null')
        opt('GlobalKnownHostsFile=/dev/null')
    else:
        opt('StrictHostKeyChecking=' +
            ('accept-new' if policy == 'accept' else 'yes'))
        if options.get('known_hosts_file'):
            opt('UserKnownHostsFile=' + options['known_hosts_file'])
    opt('ConnectTimeout=%d' % max(1, int(options.get('connect_timeout')
                                         or 30)))
    keepalive = int(options.get('keepalive_interval') or 15)
    if keepalive > 0:
        opt('ServerAliveInterval=%d' % keepalive)
        opt('ServerAliveCountMax=%d' % int(options.get('keepalive_count')
                                           or 3))
    argv.extend(options.get('ssh_args') or ())
    b64 = binascii.b2a_base64(stage1.encode('utf-8')).decode().strip()
    tail = ' -c %s %s' % (
        _sh_quote('import base64;exec(base64.b64decode("%s"))' % b64),
        _sh_quote('mitogen:' + remote_name))
    python = options.get('python_path')
    if isinstance(python, str):
        python = [python]
    if python:
        command = ' '.join(_sh_quote(a) for a in python) + tail
    else:
        command = ('for p in python3 /usr/bin/python3 python; do command -v '
                   '"$p" >/dev/null 2>&1 && exec "$p"' + tail + '; done; '
                   'echo "mitogen: no python3 or python on $(hostname)" >&2; '
                   'exit 127')
    argv.extend((host, command))
    proc = _popen(argv)
    name = 'ssh.' + host + (':%d' % int(port) if port and int(port) != 22
                            else '')
    return proc, name


