# mitogen.native.local: the file Ansible loads. The code is in the Python package
# mitogen_native.ansible (installed with mitogen-native); this file holds the
# option documentation, which Ansible reads from here.
from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
    name: local
    short_description: run tasks on the controller through a persistent mitogen-native context
    description:
        - A drop-in replacement for C(ansible.builtin.local). Tasks run in a persistent local
          Python agent (modules in a fork of it); become (sudo, su, doas) runs as a context
          started through the privilege program.
    author: mitogen-native developers
    version_added: "0.1.0"
    notes:
        - The remote user is ignored; tasks run as the user running Ansible, as with the
          stock local plugin.
    options:
      pipelining:
          description:
              - Send modules with the command that runs them (one exchange per task).
                On by default.
          default: true
          type: bool
          env:
            - name: MITOGEN_NATIVE_PIPELINING
          ini:
            - section: mitogen_native
              key: pipelining
          vars:
            - name: ansible_mitogen_pipelining
      python_interpreter:
          description:
              - The interpreter the local agent runs on, when it is a path (default the one
                running Ansible). Modules that ask for the same interpreter run in a fork of
                the agent.
          vars:
            - name: ansible_python_interpreter
      fork_modules:
          description:
              - Run a pipelined module that asks for the agent's own interpreter in a fork of
                the warm agent rather than a new interpreter.
          default: true
          type: bool
          env:
            - name: MITOGEN_NATIVE_FORK_MODULES
          ini:
            - section: mitogen_native
              key: fork_modules
          vars:
            - name: ansible_mitogen_fork_modules
      timeout:
          description: Seconds allowed to start the agent, and a become context (prompt included).
          default: 10
          type: integer
          env:
              - name: ANSIBLE_TIMEOUT
          ini:
              - key: timeout
                section: defaults
          cli:
            - name: timeout
'''

from mitogen_native.ansible.connection import LocalConnection as Connection  # noqa: E402,F401
