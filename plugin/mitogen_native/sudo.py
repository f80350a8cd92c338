"""Upstream's ``mitogen.sudo`` name for a refused or missing password
(``Router.sudo()``). The class is :class:`mitogen_native.core.PasswordError`."""
from mitogen_native.core import PasswordError  # noqa: F401
