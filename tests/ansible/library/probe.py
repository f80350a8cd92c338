#!/usr/bin/python
# A module that reports what the interpreter running it looks like, so that a
# module run in a fork of the agent can be compared with a fresh interpreter
# (the stock plugin's): argv, executable, sys.path, environment, stdio, cwd,
# ids, signal dispositions, open descriptors, modules that must not be there.
import os
import signal
import sys

from ansible.module_utils.basic import AnsibleModule


def _norm_path(p):
    # The AnsiballZ zip has a random temporary name: keep its shape only.
    if 'ansible_' in p and ('.zip' in p or 'ansible_' in os.path.basename(p)):
        return '<ansiballz>'
    return p


def main():
    module = AnsibleModule(argument_spec=dict(
        exit_code=dict(type='int', default=0),
        raise_error=dict(type='bool', default=False),
        stderr_text=dict(type='str', default=''),
        stdout_garbage=dict(type='str', default=''),
    ))
    p = module.params
    if p['stderr_text']:
        sys.stderr.write(p['stderr_text'])
        sys.stderr.flush()
    if p['raise_error']:
        raise RuntimeError('probe raised on purpose')
    if p['stdout_garbage']:
        sys.stdout.write(p['stdout_garbage'])
        sys.stdout.flush()
        sys.exit(p['exit_code'])
    env = dict((k, v) for k, v in os.environ.items()
               if not k.startswith(('SSH_', 'ANSIBLE_', 'SUDO_')) and k not in ('_', 'SHLVL', 'OLDPWD'))
    fds = sorted(int(x) for x in os.listdir('/proc/self/fd'))
    try:
        with open('/proc/%d/cmdline' % os.getppid(), 'rb') as f:
            parent = f.read().replace(b'\0', b' ').decode('utf-8', 'replace')
    except OSError:
        parent = ''
    result = dict(
        changed=False,
        argv0_is_module=sys.argv[0].endswith('probe.py') or 'probe' in sys.argv[0],
        argv_len=len(sys.argv),
        executable=sys.executable,
        path=[_norm_path(x) for x in sys.path],
        env=env,
        cwd=os.getcwd(),
        uid=os.getuid(), euid=os.geteuid(), gid=os.getgid(),
        umask=(lambda m: (os.umask(m), m)[1])(os.umask(0)),
        stdin_isatty=sys.stdin.isatty(), stdout_isatty=sys.stdout.isatty(),
        stdout_encoding=sys.stdout.encoding, stdout_errors=sys.stdout.errors,
        stderr_errors=sys.stderr.errors,
        fds_open_above_2=[fd for fd in fds if fd > 2 and fd != fds[-1]],
        sigpipe=str(signal.getsignal(signal.SIGPIPE)),
        sigint=str(signal.getsignal(signal.SIGINT)),
        sigchld=str(signal.getsignal(signal.SIGCHLD)),
        sigterm=str(signal.getsignal(signal.SIGTERM)),
        mitogen_modules=sorted(m for m in sys.modules if m.startswith('mitogen')),
        main_file=getattr(sys.modules['__main__'], '__file__', None) and '<set>',
        flags=[sys.flags.optimize, sys.flags.dont_write_bytecode, sys.flags.utf8_mode,
               sys.flags.isolated, sys.flags.no_site],
        meta_path=[type(f).__name__ for f in sys.meta_path],
        parent_is_agent='mitogen:' in parent,
    )
    if p['exit_code']:
        module.fail_json(msg='asked to fail', **result)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
