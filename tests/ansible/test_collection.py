"""The collection as users get it: built with ansible-galaxy, found by
ansible-doc and ansible-playbook, every option documented."""
import os
import re
import subprocess

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PLUGINS = os.path.join(ROOT, 'plugin', 'collection', 'plugins', 'connection')


def _documented(plugin_file):
    """The option names in a plugin file's DOCUMENTATION."""
    with open(plugin_file) as f:
        text = f.read()
    doc = re.search(r"DOCUMENTATION = r'''(.*?)'''", text, re.S).group(1)
    return sorted(yaml.safe_load(doc)['options'])


def test_ansible_doc_documents_every_option(world):
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=world['collections_path'])
    for name in ('ssh', 'local'):
        p = subprocess.run(['ansible-doc', '-t', 'connection', 'mitogen.native.' + name],
                           capture_output=True, text=True, env=env, cwd='/', timeout=120)
        assert p.returncode == 0, p.stderr
        options = _documented(os.path.join(PLUGINS, name + '.py'))
        assert options
        for option in options:
            # ansible-doc prints each option as "- name" (or "= name" if required).
            assert re.search(r'^[-=] %s\b' % re.escape(option), p.stdout, re.M), \
                '%s not in ansible-doc output:\n%s' % (option, p.stdout)

