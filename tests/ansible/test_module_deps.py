"""compat.cache_module_deps: Ansible's module building (recursive_finder) with
the imports of each file kept on disk by content gives the same payloads as
without, notices a changed file, and reports a syntax error the same way."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = os.path.join(HERE, 'library')
COLLECTIONS = os.path.join(HERE, 'collections')

# Builds each module of argv[2:] (name or NAME=PATH) with a fresh ansiballz
# cache (its own local temporary directory), argv[1]: the dependency cache
# directory or '-' for none; prints {module: [[zip entry, sha256], ...]} or
# {module: 'error: ...'}, and how many files were parsed.
BUILD = r'''
import ast, builtins, hashlib, io, json, os, sys, tempfile, zipfile, base64
import ansible.constants as C
from ansible.executor import module_common as mc
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import module_loader
from ansible.template import Templar
from ansible.errors import AnsibleError
parsed = []
real = builtins.compile
def counting(source, filename, mode, flags=0, *a, **kw):
    if flags == ast.PyCF_ONLY_AST and filename == '<unknown>':   # recursive_finder's
        parsed.append(1)
    return real(source, filename, mode, flags, *a, **kw)
builtins.compile = counting
if sys.argv[1] != '-':
    from mitogen_native.ansible import compat
    assert compat.cache_module_deps(sys.argv[1])
out = {}
for spec in sys.argv[2:]:
    name, _, path = spec.partition('=')
    C.DEFAULT_LOCAL_TMP = tempfile.mkdtemp()
    path = path or module_loader.find_plugin(name, mod_type='.py')
    try:
        data, _, _ = mc.modify_module(name, path, {}, Templar(DataLoader()),
                                      task_vars={'ansible_python_interpreter': sys.executable},
                                      module_compression='ZIP_DEFLATED')
    except AnsibleError as e:
        out[spec] = 'error: %s' % e
        continue
    start = data.index(b'ZIPDATA = """') + len(b'ZIPDATA = """')
    z = zipfile.ZipFile(io.BytesIO(base64.b64decode(data[start:data.index(b'"""', start)])))
    out[spec] = [[n, hashlib.sha256(z.read(n)).hexdigest()] for n in z.namelist()]
print(json.dumps({'payloads': out, 'parsed': len(parsed)}))
'''


def build(cache, *modules):
    env = dict(os.environ)
    env['ANSIBLE_COLLECTIONS_PATH'] = COLLECTIONS
    env.pop('MITOGEN_NATIVE_MODULE_DEPS', None)
    p = subprocess.run([sys.executable, '-c', BUILD, str(cache or '-')] + list(modules),
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


MODULES = ('ping', 'copy', 'setup', 'stat',
           'cprobe=%s' % os.path.join(COLLECTIONS, 'ansible_collections', 'mntest', 'warm',
                                      'plugins', 'modules', 'cprobe.py'))


def test_same_payloads_with_the_cache(tmp_path):
    plain = build(None, *MODULES)
    first = build(tmp_path, *MODULES)      # fills the cache
    again = build(tmp_path, *MODULES)      # uses it
    assert first['payloads'] == plain['payloads'] == again['payloads']
    for spec, entries in plain['payloads'].items():
        assert isinstance(entries, list) and len(entries) > 3, (spec, entries)
    assert os.listdir(str(tmp_path))
    # (the first build with the cache reuses what its earlier modules found)
    assert plain['parsed'] > 50 and 0 < first['parsed'] < plain['parsed']
    assert again['parsed'] == 0, again['parsed']


def test_a_changed_file_is_parsed_again(tmp_path):
    module = tmp_path / 'mymod.py'
    head = ('#!/usr/bin/python\nfrom ansible.module_utils.basic import AnsibleModule\n')
    tail = ('def main():\n    AnsibleModule(argument_spec={}).exit_json()\n'
            'if __name__ == "__main__":\n    main()\n')
    cache = tmp_path / 'cache'
    module.write_text(head + tail)
    before = build(cache, 'mymod=%s' % module)['payloads']['mymod=%s' % module]
    assert not any(n.endswith('dict_transformations.py') for n, _ in before)
    module.write_text(head + 'from ansible.module_utils.common.dict_transformations '
                      'import dict_merge\n' + tail)
    both = build(None, 'mymod=%s' % module), build(cache, 'mymod=%s' % module)
    after = [b['payloads']['mymod=%s' % module] for b in both]
    assert after[0] == after[1]
    assert any(n.endswith('common/dict_transformations.py') for n, _ in after[1])


def test_syntax_error_is_reported_as_without_the_cache(tmp_path):
    module = tmp_path / 'broken.py'
    module.write_text('from ansible.module_utils.basic import AnsibleModule\ndef f(:\n')
    spec = 'broken=%s' % module
    plain = build(None, spec)['payloads'][spec]
    cached = [build(tmp_path / 'cache', spec)['payloads'][spec] for _ in range(2)]
    assert plain.startswith('error: Unable to import broken due to'), plain
    assert cached == [plain, plain]


def test_off_switch(tmp_path):
    env = dict(os.environ, MITOGEN_NATIVE_MODULE_DEPS='0')
    p = subprocess.run([sys.executable, '-c',
                        'from mitogen_native.ansible import compat; import sys; '
                        'print(compat.cache_module_deps(sys.argv[1]))', str(tmp_path)],
                       env=env, capture_output=True, text=True)
    assert p.stdout.strip() == 'False', p.stderr


def test_a_damaged_entry_is_found_again(tmp_path):
    """A cache file that does not hold what we wrote (truncated, edited) is
    not trusted: the file is parsed again and the payload is the same."""
    spec = 'ping'
    plain = build(None, spec)['payloads'][spec]
    cache = tmp_path / 'cache'
    build(cache, spec)
    for name in os.listdir(str(cache)):
        with open(str(cache / name), 'w') as f:
            f.write(json.dumps({'ansible.module_utils.basic|0': [['x'], 'y'],
                                'ansible.modules.ping|0': [[['not', 1]], []]}))
    again = build(cache, spec)
    assert again['payloads'][spec] == plain
    assert again['parsed'] > 0
