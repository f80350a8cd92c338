"""Upstream's ``mitogen.ssh`` names for the errors of ``Router.ssh()``, so that
``except mitogen_native.ssh.HostKeyError`` works as it does upstream. The
classes are those of :mod:`mitogen_native.core`."""
from mitogen_native.core import HostKeyError, PasswordError  # noqa: F401
