"""Upstream's ``mitogen.doas`` name for a refused or missing password
(``Router.doas()``). The class is :class:`mitogen_native.core.PasswordError`."""
from mitogen_native.core import PasswordError  # noqa: F401
