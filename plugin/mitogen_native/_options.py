"""Checking and converting the options of the API's methods (Router.local, ssh,
sudo, ..., Context.put_file, ...) before anything is started.

Upstream Mitogen stores most options as given and formats them into a command
line later, so a numeric string (``port='2222'``, ``connect_timeout='10'``) works
there; it works here too. Anything else of the wrong type raises ``TypeError``
naming the option and the type it takes, instead of a conversion error from deep
inside the extension."""
import os

_TRUE = frozenset(('1', 'true', 'yes', 'on'))
_FALSE = frozenset(('0', 'false', 'no', 'off', ''))


def _kind(v):
    return type(v).__name__


def _refuse(name, expected, v):
    raise TypeError('%s must be %s, not %r (%s)' % (name, expected, v, _kind(v)))


def as_int(name, v, minimum=None, maximum=None):
    """None, an int or a string holding one (``'2222'``) -> int or None."""
    if v is None:
        return None
    if isinstance(v, bool):
        _refuse(name, 'an int', v)
    if isinstance(v, int):
        n = v
    elif isinstance(v, (str, bytes)):
        try:
            n = int(v.strip())
        except ValueError:
            _refuse(name, 'an int or a numeric string', v)
    elif hasattr(v, '__index__'):
        n = v.__index__()
    else:
        _refuse(name, 'an int', v)
    if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
        raise ValueError('%s must be between %s and %s, not %d' % (
            name, minimum if minimum is not None else '-inf',
            maximum if maximum is not None else 'inf', n))
    return n


def as_float(name, v, positive=False):
    """None, an int, a float or a numeric string (seconds) -> float or None."""
    if v is None:
        return None
    if isinstance(v, bool):
        _refuse(name, 'a number of seconds', v)
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, (str, bytes)):
        try:
            f = float(v.strip())
        except ValueError:
            _refuse(name, 'a number or a numeric string', v)
    else:
        _refuse(name, 'a number of seconds', v)
    if f != f or (positive and not f > 0) or f < 0:
        raise ValueError('%s must be %s, not %r' % (
            name, 'positive' if positive else 'zero or more', v))
    return f


def as_bool(name, v):
    """None, a bool, 0/1 or a yes/no string (``'true'``, ``'no'``...) -> bool or None."""
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    _refuse(name, 'a bool', v)


def as_str(name, v):
    """None, a str, bytes (UTF-8) or a path-like -> str or None."""
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (bytes, os.PathLike)):
        try:
            return os.fsdecode(v)
        except (TypeError, UnicodeDecodeError):
            pass
    _refuse(name, 'a str', v)


def as_str_list(name, v, split=False, ints=False):
    """None, one string (a single item, or split on whitespace when `split`:
    ``"-H -S"``) or an iterable of strings (and ints, when `ints`: upstream
    formats ``ssh_args=['-p', 2222]`` into a command line) -> list or None."""
    if v is None:
        return None
    if isinstance(v, (str, bytes, os.PathLike)):
        s = as_str(name, v)
        return s.split() if split else [s]
    try:
        items = list(v)
    except TypeError:
        _refuse(name, 'a str or a list of str', v)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (str, bytes, os.PathLike)):
            out.append(as_str(name, item))
        elif ints and isinstance(item, int) and not isinstance(item, bool):
            out.append(str(item))
        else:
            _refuse('%s[%d]' % (name, i), 'a str', item)
    return out


def as_choice(name, v, choices):
    """One of `choices` (strings)."""
    s = as_str(name, v)
    if s not in choices:
        raise ValueError('%s must be %s, not %r' % (
            name, ', '.join(repr(c) for c in choices[:-1]) + ' or %r' % (choices[-1],), v))
    return s


def as_mode(name, v):
    """None, an int, or a string of octal digits as chmod takes it (``'0644'``,
    ``'0o644'``) -> int or None."""
    if v is None:
        return None
    if isinstance(v, str):
        s = v.strip().lower()
        if s.startswith('0o'):
            s = s[2:]
        try:
            return int(s, 8)
        except ValueError:
            _refuse(name, 'an int or an octal string', v)
    return as_int(name, v)
