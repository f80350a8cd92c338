"""Options of the API's methods (issue 13): what upstream accepts (a numeric
string for a number) works, anything else is a TypeError naming the option and
the type it takes, raised before anything is started."""
import os
import socket

import pytest

import mitogen_native.core
import mitogen_native.master

import remote_helpers
from servers import CAN_RUN_SSHD, ssh_kwargs


def _closed_port():
    """A loopback port nobody listens on (bound then closed)."""
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize('kwargs, option, expected', [
    (dict(port='twenty-two'), 'port', 'int'),
    (dict(port=22.5), 'port', 'int'),
    (dict(port=True), 'port', 'int'),
    (dict(connect_timeout='soon'), 'connect_timeout', 'number'),
    (dict(username=42), 'username', 'str'),
    (dict(identity_file=7), 'identity_file', 'str'),
    (dict(python_path=[3]), 'python_path[0]', 'str'),
    (dict(debug='maybe'), 'debug', 'bool'),
    (dict(check_host_keys=1), 'check_host_keys', 'str'),
])
def test_ssh_option_of_the_wrong_type_names_option_and_type(router, kwargs, option, expected):
    args = dict(hostname='127.0.0.1')
    args.update(kwargs)
    with pytest.raises(TypeError) as e:
        router.ssh(**args)
    assert option in str(e.value) and expected in str(e.value)


def test_ssh_port_as_numeric_string_is_used(router):
    # Nothing listens there: the error is the connection's, so the port was taken.
    port = _closed_port()
    with pytest.raises(mitogen_native.core.StreamError) as e:
        router.ssh(hostname='127.0.0.1', port=str(port), connect_timeout='10',
                   known_hosts_file=os.devnull)
    assert str(port) in str(e.value)


@pytest.mark.skipif(not CAN_RUN_SSHD, reason='needs root and openssh-server for a loopback sshd')
def test_ssh_with_string_port_and_timeout_connects(sshd, router):
    kw = ssh_kwargs(sshd, port=str(sshd['port']), connect_timeout='20')
    ctx = router.ssh(**kw)
    assert ctx.call(os.getpid) != os.getpid()


@pytest.mark.parametrize('kwargs, option', [
    (dict(connect_timeout=[1]), 'connect_timeout'),
    (dict(python_path=5), 'python_path'),
    (dict(remote_name=3.5), 'remote_name'),
    (dict(name=12), 'name'),
    (dict(debug=object()), 'debug'),
])
def test_local_option_of_the_wrong_type(router, kwargs, option):
    with pytest.raises(TypeError) as e:
        router.local(**kwargs)
    assert option in str(e.value)


def test_local_numeric_string_timeout(router):
    ctx = router.local(connect_timeout='20', debug='false')
    assert ctx.call(os.getpid) != os.getpid()


def test_sudo_option_of_the_wrong_type(router):
    with pytest.raises(TypeError) as e:
        router.sudo(username='root', connect_timeout={'s': 1})
    assert 'connect_timeout' in str(e.value)
    with pytest.raises(TypeError) as e:
        router.su(username=['root'])
    assert 'username' in str(e.value)


def test_context_methods_take_numeric_strings(context, tmp_path):
    src = tmp_path / 'src'
    src.write_bytes(b'x' * 10000)
    n = context.put_file(str(src), str(tmp_path / 'dst'), mode='0640', chunk_size='4096',
                         window='2', timeout='30')
    assert n == 10000
    assert (os.stat(tmp_path / 'dst').st_mode & 0o7777) == 0o640
    assert context.call_async(remote_helpers.add, 1, 2).get(timeout='30') == 3


@pytest.mark.parametrize('kwargs, option', [
    (dict(chunk_size='big'), 'chunk_size'),
    (dict(window=[1]), 'window'),
    (dict(timeout='never'), 'timeout'),
    (dict(mode='rw-r--r--'), 'mode'),
])
def test_put_file_option_of_the_wrong_type(context, tmp_path, kwargs, option):
    src = tmp_path / 'src'
    src.write_bytes(b'x')
    with pytest.raises(TypeError) as e:
        context.put_file(str(src), str(tmp_path / 'dst'), **kwargs)
    assert option in str(e.value)
    assert not (tmp_path / 'dst').exists()


def test_receiver_and_shutdown_timeouts(router):
    ctx = router.local()
    with pytest.raises(TypeError) as e:
        ctx.call_async(os.getpid).get(timeout='later')
    assert 'timeout' in str(e.value)
    with pytest.raises(TypeError) as e:
        ctx.shutdown(wait=True, timeout=[5])
    assert 'timeout' in str(e.value)
    ctx.shutdown(wait=True, timeout='30')


def _doc_table_options(path, heading):
    """Option names in the first column of the table under `heading`."""
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, '..', '..', 'docs', path)) as f:
        text = f.read()
    table = text[text.index(heading):]
    names = []
    for line in table.splitlines()[1:]:
        if line.startswith('#'):
            break
        if line.startswith('| `'):
            names += re.findall(r'`(\w+)`', line.split('|')[1])
    return names


def _documented_params(fn):
    import inspect
    doc = inspect.getdoc(fn)
    params = [p for p in inspect.signature(fn).parameters if p not in ('self', 'kwargs')]
    missing = [p for p in params if not any(
        line.strip().startswith(':param') and p in line.split(':')[1].replace(',', ' ').split()
        for line in doc.splitlines())]
    return params, missing


def test_ssh_takes_every_option_docs_ssh_md_lists():
    import inspect
    documented = _doc_table_options('ssh.md', '## Options')
    assert {'identity_files', 'use_agent', 'keepalive_count', 'compression',
            'max_message_size', 'log_level'} <= set(documented)
    params = inspect.signature(mitogen_native.master.Router.ssh).parameters
    assert [o for o in documented if o not in params] == []
    # and upstream's names for the same things
    assert {'identity_file', 'identities_only', 'ssh_debug_level', 'compression'} <= set(params)


def test_local_takes_every_option_the_docs_list():
    import inspect
    documented = _doc_table_options('getting-started.md', 'Options of `local()`')
    assert {'log_level', 'max_message_size'} <= set(documented)
    params = inspect.signature(mitogen_native.master.Router.local).parameters
    assert [o for o in documented if o not in params] == []


@pytest.mark.parametrize('method', ['local', 'ssh', 'sudo'])
def test_docstrings_document_every_parameter(method):
    params, missing = _documented_params(getattr(mitogen_native.master.Router, method))
    assert params and missing == []


def test_local_max_message_size_and_log_level(router, caplog):
    import logging
    small = router.local(max_message_size='65536', log_level='DEBUG')
    assert small.call(remote_helpers.identity, 'x' * 1000) == 'x' * 1000
    with pytest.raises(mitogen_native.core.ChannelError):
        small.call(remote_helpers.identity, 'x' * 100000)
    assert router.local().call(remote_helpers.identity, 'x' * 100000) == 'x' * 100000
    with pytest.raises(ValueError):
        router.local(log_level='LOUD')


@pytest.mark.skipif(not CAN_RUN_SSHD, reason='needs root and openssh-server for a loopback sshd')
def test_ssh_documented_and_upstream_options_connect(sshd, router):
    kw = ssh_kwargs(sshd)
    key = kw.pop('identity_file')
    a = router.ssh(identity_files=[key], use_agent=False, keepalive_count=5,
                   keepalive_interval='10', compression=True, max_message_size=1 << 20,
                   log_level='INFO', **kw)
    b = router.ssh(identity_file=key, identities_only=True, ssh_debug_level=1,
                   compression='yes', **kw)
    c = router.ssh(identity_file=key, ssh_debug_level=1, transport='openssh', **kw)
    assert len({a.call(os.getpid), b.call(os.getpid), c.call(os.getpid), os.getpid()}) == 4
    with pytest.raises(mitogen_native.core.ChannelError):
        a.call(remote_helpers.identity, 'x' * (2 << 20))


def test_one_entry_point_reads_every_option_it_is_given(router):
    """Router.local/ssh/sudo/su/doas all reach the extension through
    Router._connect(method, options) (docs/architecture.md, "The plugin seam"):
    an option the method does not read is refused there, never dropped."""
    with pytest.raises(TypeError, match='unexpected option for this connection method: sudo_path'):
        router._connect('su', dict(sudo_path='/usr/bin/sudo'))
    with pytest.raises(TypeError, match='unexpected option .*: hostname'):
        router._connect('local', dict(hostname='example.org'))
    with pytest.raises(ValueError, match="method must be"):
        router._connect('telnet', {})
    with pytest.raises(ValueError, match="check_host_keys must be one of 'enforce', 'accept', 'ignore'"):
        router._connect('ssh', dict(hostname='127.0.0.1', check_host_keys='maybe'))
    # None means "not given", whatever the method.
    ctx = router._connect('local', dict(python_path=['/usr/bin/python3'], sudo_path=None))
    assert ctx.call(os.getpid) != os.getpid()
