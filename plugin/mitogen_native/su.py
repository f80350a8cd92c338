"""Upstream's ``mitogen.su`` name for a refused or missing password
(``Router.su()``). The class is :class:`mitogen_native.core.PasswordError`."""
from mitogen_native.core import PasswordError  # noqa: F401
