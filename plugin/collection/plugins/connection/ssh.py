# mitogen.native.ssh: the file Ansible loads. The code is in the Python package
# mitogen_native.ansible (installed with mitogen-native); this file holds the
# option documentation, which Ansible reads from here (ansible-doc parses it
# without importing anything).
from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
    name: ssh
    short_description: run tasks over SSH through persistent mitogen-native contexts
    description:
        - A drop-in replacement for C(ansible.builtin.ssh). Each host gets one persistent
          Python agent over one SSH connection (the SSH client runs in-process, libssh2);
          modules run in it with pipelining, in a fork of the warm agent when they ask
          for the agent's own interpreter.
        - Works under every stock strategy; set C(ansible_connection=mitogen.native.ssh)
          and nothing else.
        - become (sudo, su, doas) runs as a second context on the target, started
          through the privilege program with C(become_pass) answering its prompt.
        - Contexts are kept by the mitogen-native daemon when it is installed, so
          consecutive tasks and runs share them; otherwise each worker keeps its own.
    author: mitogen-native developers
    version_added: "0.1.0"
    notes:
        - Options of the stock ssh plugin with the same name are read from the same
          variables, ansible.cfg keys and environment variables.
        - Of the ssh command-line options in I(ssh_args), I(ssh_common_args) and
          I(ssh_extra_args), these are honoured by the in-process client C(-o Port), C(-p),
          C(-o User), C(-l), C(-o IdentityFile), C(-i), C(-o UserKnownHostsFile),
          C(-o StrictHostKeyChecking), C(-o ServerAliveInterval), C(-o ConnectTimeout),
          C(-o ProxyJump), C(-J) (each jump host becomes a context of its own), C(-o HostName)
          and C(-F). ControlMaster, ControlPersist, ControlPath, Compression, C(-C), BatchMode
          and the authentication preferences are accepted and need nothing. Any other
          option is ignored with one warning naming it, unless I(ssh_transport=openssh).
        - C(~/.ssh/config) (Host, HostName, User, Port, IdentityFile) and the ssh agent
          (C(SSH_AUTH_SOCK)) are used as by OpenSSH.
    options:
      host:
          description: Hostname or address to connect to.
          default: inventory_hostname
          vars:
               - name: inventory_hostname
               - name: ansible_host
               - name: ansible_ssh_host
               - name: delegated_vars['ansible_host']
               - name: delegated_vars['ansible_ssh_host']
      host_key_checking:
          description:
              - Check the host key against the known-hosts file (refuse unknown and changed
                keys). False accepts any key.
              - C(-o StrictHostKeyChecking) in the ssh arguments takes precedence
                (C(accept-new) records unknown keys).
          default: True
          type: boolean
          ini:
              - section: defaults
                key: 'host_key_checking'
              - section: ssh_connection
                key: 'host_key_checking'
          env:
              - name: ANSIBLE_HOST_KEY_CHECKING
              - name: ANSIBLE_SSH_HOST_KEY_CHECKING
          vars:
              - name: ansible_host_key_checking
              - name: ansible_ssh_host_key_checking
      password:
          description:
              - Password of I(remote_user), for password or keyboard-interactive
                authentication (no sshpass needed).
          vars:
              - name: ansible_password
              - name: ansible_ssh_pass
              - name: ansible_ssh_password
      ssh_args:
          description:
              - Arguments as for the ssh binary; see the notes for which are honoured.
                Unlike the stock plugin there is no default (ControlPersist and
                compression are not needed).
          default: ''
          ini:
              - section: 'ssh_connection'
                key: 'ssh_args'
          env:
              - name: ANSIBLE_SSH_ARGS
          vars:
              - name: ansible_ssh_args
      ssh_common_args:
          description: Common extra arguments, as for the stock plugin.
          ini:
              - section: 'ssh_connection'
                key: 'ssh_common_args'
          env:
              - name: ANSIBLE_SSH_COMMON_ARGS
          vars:
              - name: ansible_ssh_common_args
          cli:
              - name: ssh_common_args
          default: ''
      ssh_extra_args:
          description: Extra arguments for ssh, as for the stock plugin.
          vars:
              - name: ansible_ssh_extra_args
          env:
            - name: ANSIBLE_SSH_EXTRA_ARGS
          ini:
            - key: ssh_extra_args
              section: ssh_connection
          cli:
            - name: ssh_extra_args
          default: ''
      port:
          description: Remote port (default C(~/.ssh/config)'s Port, else 22).
          type: int
          ini:
            - section: defaults
              key: remote_port
          env:
            - name: ANSIBLE_REMOTE_PORT
          vars:
            - name: ansible_port
            - name: ansible_ssh_port
          keyword:
            - name: port
      remote_user:
          description:
              - User to log in as (default C(~/.ssh/config)'s User, else the local user).
          ini:
            - section: defaults
              key: remote_user
          env:
            - name: ANSIBLE_REMOTE_USER
          vars:
            - name: ansible_user
            - name: ansible_ssh_user
          cli:
            - name: user
          keyword:
            - name: remote_user
      private_key_file:
          description:
              - Private key file to authenticate with (a key with a passphrase must be
                loaded into the ssh agent instead).
          ini:
            - section: defaults
              key: private_key_file
          env:
            - name: ANSIBLE_PRIVATE_KEY_FILE
          vars:
            - name: ansible_private_key_file
            - name: ansible_ssh_private_key_file
          cli:
            - name: private_key_file
              option: '--private-key'
      timeout:
          description:
              - Seconds allowed to connect, authenticate and start the remote agent; also
                bounds a become context's start, password prompt included.
          default: 10
          type: integer
          env:
              - name: ANSIBLE_TIMEOUT
              - name: ANSIBLE_SSH_TIMEOUT
          ini:
              - key: timeout
                section: defaults
              - key: timeout
                section: ssh_connection
          vars:
            - name: ansible_ssh_timeout
          cli:
            - name: timeout
      use_tty:
          description:
              - Run sudoable commands without input (C(raw), C(script), ...) under a
                pseudo-terminal, as C(ssh -tt) does for the stock plugin (stderr merged into
                stdout, CRLF line ends).
          default: true
          type: bool
          env: [{name: ANSIBLE_SSH_USETTY}]
          ini:
          - {key: usetty, section: ssh_connection}
          vars:
            - name: ansible_ssh_use_tty
      pipelining:
          description:
              - Send modules to the agent with the command that runs them (one exchange per
                task). On by default; false makes Ansible copy modules to a temporary
                directory first, as without pipelining.
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
              - The interpreter the remote agent runs on, when it is a path (modules that
                ask for the same interpreter run in a fork of the agent). C(auto) and the
                other discovery modes leave the agent's interpreter to the connection
                (the first of python3, /usr/bin/python3, python) while Ansible discovers the
                one for modules as usual.
          vars:
            - name: ansible_python_interpreter
      fork_modules:
          description:
              - Run a pipelined module that asks for the agent's own interpreter in a fork of
                the warm agent rather than a new interpreter. False always starts a new
                interpreter, as the stock plugin does.
          default: true
          type: bool
          env:
            - name: MITOGEN_NATIVE_FORK_MODULES
          ini:
            - section: mitogen_native
              key: fork_modules
          vars:
            - name: ansible_mitogen_fork_modules
      ssh_transport:
          description:
              - C(libssh2) runs the SSH client inside the process that owns the connection.
                C(openssh) runs the ssh binary instead, with every ssh option passed to it
                (ProxyCommand, certificates, GSSAPI, ...); passwords are not supported then.
          default: libssh2
          choices: [libssh2, openssh]
          env:
            - name: MITOGEN_NATIVE_SSH_TRANSPORT
          ini:
            - section: mitogen_native
              key: ssh_transport
          vars:
            - name: ansible_mitogen_ssh_transport
      ssh_executable:
          description: The ssh binary, for I(ssh_transport=openssh).
          default: ssh
          env: [{name: ANSIBLE_SSH_EXECUTABLE}]
          ini:
          - {key: ssh_executable, section: ssh_connection}
          vars:
              - name: ansible_ssh_executable
'''

EXAMPLES = r'''
# inventory
[web]
web1.example.com
web2.example.com

[web:vars]
ansible_connection=mitogen.native.ssh

# or for everything, in ansible.cfg:
# [defaults]
# transport = mitogen.native.ssh
'''

from mitogen_native.ansible.connection import SshConnection as Connection  # noqa: E402,F401
