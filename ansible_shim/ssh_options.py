"""Ansible's ssh settings -> the hops of a connection stack.

The stock ssh plugin builds one ``ssh`` command line: ``ssh_args``, then the
options it derives from Ansible's settings (host key checking, port, key file,
user, timeout), then ``ssh_common_args`` and ``ssh_extra_args``. OpenSSH keeps
the *first* value it sees for each option (IdentityFile accumulates). This
module builds the same list and reads it the same way, so the precedence
between inventory variables and ``-o`` options is the stock plugin's.

Options the in-process client (libssh2) serves become hop keywords; the rest
are reported by name so the plugin can warn once. With ``ssh_transport:
openssh`` they are passed to the ssh binary instead.
"""
import os
import shlex

#: ``-o`` options understood and applied (lower-case).
HONOURED = ('port', 'user', 'identityfile', 'userknownhostsfile',
            'stricthostkeychecking', 'serveraliveinterval', 'connecttimeout',
            'proxyjump', 'hostname')
#: ``-o`` options that need nothing from us: our own persistent connection
#: replaces ControlMaster & co., we never prompt (BatchMode), passwords are
#: used only when ansible_password is set, and Compression is not offered by
#: the in-process client (accepted, not applied).
IRRELEVANT = ('controlmaster', 'controlpersist', 'controlpath', 'batchmode',
              'loglevel', 'passwordauthentication', 'kbdinteractiveauthentication',
              'preferredauthentications', 'compression', 'tcpkeepalive',
              'gssapiauthentication', 'requesttty', 'visualhostkey',
              'hashknownhosts', 'updatehostkeys')

_FLAGS_WITH_ARG = set('BbcDEeFIiJLlmOoPpQRSWw')
_FLAGS_SILENT = set('CqvTtNnsfMVK')   # no effect on what we run, or meaningless here


def split_args(text):
    """'-o Foo=1 -o Bar="foo bar"' -> ['-o', 'Foo=1', '-o', 'Bar=foo bar']
    (the stock plugin's _split_ssh_args)."""
    if not text:
        return []
    if isinstance(text, (list, tuple)):
        return [str(a) for a in text]
    return [str(x).strip() for x in shlex.split(str(text)) if x.strip()]


def _unquote(v):
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        v = v[1:-1]
    return v


def _parse_o(text):
    """'Key=Value', 'Key Value' or 'Key = Value' -> (key.lower(), value)."""
    text = text.strip()
    for i, c in enumerate(text):
        if c in '= \t':
            key, rest = text[:i], text[i:].lstrip(' \t')
            if rest.startswith('='):
                rest = rest[1:].lstrip(' \t')
            return key.lower(), _unquote(rest)
    return text.lower(), ''


class Parsed(object):
    """What a command line asks for: ``options`` (first value of each -o key,
    lower-case), ``identity_files`` (all, in order), ``config_file`` (-F),
    ``unsupported`` (names, for the warning) and ``passthrough`` (the
    arguments an openssh transport can take as they are)."""

    def __init__(self):
        self.options = {}
        self.identity_files = []
        self.config_file = None
        self.unsupported = []
        self.passthrough = []

    def set(self, key, value, original):
        if key == 'identityfile':
            self.identity_files.append(value)
        elif key in HONOURED:
            self.options.setdefault(key, value)
        elif key not in IRRELEVANT:
            if original not in self.unsupported:
                self.unsupported.append(original)
            self.passthrough += ['-o', '%s=%s' % (original, value)]


def parse(argv, parsed=None):
    """Read an ssh argument list into a :class:`Parsed`."""
    p = parsed or Parsed()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith('-') or arg == '-':
            p.unsupported.append(arg)   # a host name or command: not ours to run
            continue
        j = 1
        while j < len(arg):
            flag = arg[j]
            j += 1
            if flag in _FLAGS_WITH_ARG:
                value = arg[j:]
                if not value:
                    if i >= len(argv):
                        p.unsupported.append('-' + flag)
                        break
                    value = argv[i]
                    i += 1
                if flag == 'o':
                    key, v = _parse_o(value)
                    original = value.split('=', 1)[0].split()[0] if value.strip() else value
                    p.set(key, v, original)
                elif flag == 'i':
                    p.identity_files.append(_unquote(value))
                elif flag == 'p':
                    p.options.setdefault('port', value)
                elif flag == 'l':
                    p.options.setdefault('user', value)
                elif flag == 'J':
                    p.options.setdefault('proxyjump', value)
                elif flag == 'F':
                    if p.config_file is None:
                        p.config_file = value
                else:
                    p.unsupported.append('-' + flag)
                    p.passthrough += ['-' + flag, value]
                break
            elif flag in _FLAGS_SILENT:
                continue
            else:
                p.unsupported.append('-' + flag)
                p.passthrough.append('-' + flag)
    return p


def _host_key_policy(value):
    v = (value or '').strip().lower()
    if v in ('no', 'off', 'false'):
        return 'ignore'
    if v == 'accept-new':
        return 'accept'
    return 'enforce'     # yes, ask (we never prompt: BatchMode), anything else


def _jump_specs(value):
    """'[user@]host[:port],...' (or ssh://user@host:port) -> [(user, host, port)]."""
    hops = []
    if not value or value.strip().lower() == 'none':
        return hops
    for spec in value.split(','):
        spec = spec.strip()
        if spec.startswith('ssh://'):
            spec = spec[len('ssh://'):]
        user = None
        if '@' in spec:
            user, spec = spec.rsplit('@', 1)
        port = None
        if spec.startswith('['):            # [v6addr]:port
            host, _, rest = spec[1:].partition(']')
            if rest.startswith(':'):
                port = int(rest[1:])
        elif spec.count(':') == 1:
            host, port = spec.split(':')
            port = int(port)
        else:
            host = spec
        hops.append((user, host, port))
    return hops


def _expand(path):
    return os.path.expanduser(path) if path else path


def ssh_stack(host, port=None, user=None, password=None, private_key_file=None,
              timeout=None, host_key_checking=True, ssh_args=None,
              ssh_common_args=None, ssh_extra_args=None, python_path=None,
              transport='libssh2', ssh_executable=None):
    """The hops for one target, and the option names not honoured.

    Returns ``(hops, unsupported)``: ``hops`` is a list of ``method: ssh``
    dicts (ProxyJump hosts first), ``unsupported`` the names of options that
    were ignored (empty with the openssh transport, which receives them).
    """
    argv = split_args(ssh_args)
    if host_key_checking is False:
        argv += ['-o', 'StrictHostKeyChecking=no']
    if port is not None:
        argv += ['-o', 'Port=%s' % (port,)]
    if private_key_file:
        argv += ['-o', 'IdentityFile="%s"' % (_expand(private_key_file),)]
    if user:
        argv += ['-o', 'User="%s"' % (user,)]
    if timeout is not None:
        argv += ['-o', 'ConnectTimeout=%s' % (timeout,)]
    argv += split_args(ssh_common_args)
    argv += split_args(ssh_extra_args)
    p = parse(argv)
    o = p.options

    def intval(key):
        v = o.get(key)
        if v is None or v == '':
            return None
        try:
            return int(v)
        except ValueError:
            raise ValueError('ssh option %s=%r is not a number' % (key, v))

    common = {}
    policy = _host_key_policy(o.get('stricthostkeychecking')) if 'stricthostkeychecking' in o \
        else ('enforce' if host_key_checking is not False else 'ignore')
    common['check_host_keys'] = policy
    known = o.get('userknownhostsfile')
    if known:
        first = known.split()[0]
        if first not in ('none', '/dev/null'):
            common['known_hosts_file'] = _expand(first)
        elif policy != 'ignore':
            # An empty known-hosts file: nothing is known.
            common['known_hosts_file'] = '/dev/null'
    if intval('connecttimeout') is not None:
        common['connect_timeout'] = intval('connecttimeout')
    if intval('serveraliveinterval') is not None:
        common['keepalive_interval'] = intval('serveraliveinterval')
    if p.config_file:
        common['ssh_config_file'] = _expand(p.config_file) if p.config_file.lower() != 'none' else ''

    target = dict(common)
    target['method'] = 'ssh'
    target['hostname'] = o.get('hostname') or host
    if intval('port') is not None:
        target['port'] = intval('port')
    if o.get('user'):
        target['username'] = o['user']
    if password:
        target['password'] = password
    if p.identity_files:
        target['identity_file'] = [_expand(f) for f in p.identity_files]
    if python_path:
        target['python_path'] = list(python_path)

    hops = []
    unsupported = list(p.unsupported)
    if transport == 'openssh':
        target['transport'] = 'openssh'
        extra = list(p.passthrough)
        if o.get('proxyjump'):
            extra += ['-o', 'ProxyJump=%s' % o['proxyjump']]
        if extra:
            target['ssh_args'] = extra
        if ssh_executable:
            target['ssh_path'] = ssh_executable
        unsupported = []
    else:
        for juser, jhost, jport in _jump_specs(o.get('proxyjump')):
            hop = dict(common)
            hop['method'] = 'ssh'
            hop['hostname'] = jhost
            if jport is not None:
                hop['port'] = jport
            if juser:
                hop['username'] = juser
            if p.identity_files:
                hop['identity_file'] = [_expand(f) for f in p.identity_files]
            hops.append(hop)
    hops.append(target)
    return hops, unsupported
