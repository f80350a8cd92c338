"""mitogen_native.ansible: the Python behind the Ansible collection
``mitogen.native`` (connection plugins ``mitogen.native.ssh`` and
``mitogen.native.local``), written for ansible-core 2.14.

* :mod:`.connection`: the connection classes the collection's plugin files import;
* :mod:`.backend`: where contexts live (the daemon, or this process);
* :mod:`.ssh_options`: Ansible's ssh settings -> connection stack hops;
* :mod:`.compat`: what depends on Ansible's internals, in one place.

The target side is the top-level module ``mitogen_native_target`` (standalone,
stdlib only), which the agents import through module forwarding.
See docs/ansible.md.
"""
