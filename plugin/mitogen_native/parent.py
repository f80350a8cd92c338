"""Upstream's ``mitogen.parent`` names for the errors of starting a context
(``EofError``: the connection failed or closed during start-up). The classes
are those of :mod:`mitogen_native.core`."""
from mitogen_native.core import EofError, StreamError, TimeoutError  # noqa: F401
