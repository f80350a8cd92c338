"""Join the agent's parts into the one program every context runs.

The agent ships as one source text, executed as the module ``mitogen.core``
(one namespace: pickle names ``mitogen.core.X``), but is written as parts of
100-400 lines:

* ``parts/*.py``, joined in the order of their names: the code every context
  runs;
* ``via/*.py``, joined the same way into the string ``_VIA_SOURCE``, the code
  a context needs only once it starts contexts of its own (``via=``), compiled
  on first use (``_load_via``);
* ``stage1.py``, the first stage, injected into the via code as ``_STAGE1``
  (a context starts its children with the same first stage the master uses).

A part holds a marker line where the build puts what is generated:
``_VIA_SOURCE = None  # build_agent`` and ``_STAGE1 = None  # build_agent``.
The build (core/cmake/embed_agent.py) and the agent's tests
(tests/agent/fake_master.py) both call :func:`agent_source`, so the tests run
exactly what ships.

    build_agent.py OUT      writes the joined agent to OUT
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VIA_MARKER = '_VIA_SOURCE = None  # build_agent\n'
STAGE1_MARKER = '_STAGE1 = None  # build_agent\n'


def _read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def _join(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith('.py'))
    if not names:
        raise SystemExit('build_agent: no parts in %s' % folder)
    return ''.join(_read(os.path.join(folder, n)) for n in names)


def _replace_once(text, marker, value, where):
    if text.count(marker) != 1:
        raise SystemExit('build_agent: %s must hold %r exactly once' % (where, marker.strip()))
    return text.replace(marker, value)


def stage1_source(agent_dir=HERE):
    return _read(os.path.join(agent_dir, 'stage1.py'))


def agent_source(agent_dir=HERE):
    """The agent's source text, as it is compressed and sent to a context."""
    stage1 = stage1_source(agent_dir)
    if '"""' in stage1 or "'''" in stage1:
        raise SystemExit('build_agent: stage1.py cannot hold triple quotes')
    via = _join(os.path.join(agent_dir, 'via'))
    # Inside r'''...''' the via code is verbatim; inside it, _STAGE1 is an
    # ordinary string literal, so stage 1's backslashes are doubled.
    via = _replace_once(via, STAGE1_MARKER,
                        '_STAGE1 = """' + stage1.replace('\\', '\\\\') + '"""\n', 'via/')
    if "'''" in via:
        raise SystemExit("build_agent: the via parts cannot hold ''' (they live in r'''...''')")
    return _replace_once(_join(os.path.join(agent_dir, 'parts')), VIA_MARKER,
                         "_VIA_SOURCE = r'''\n" + via + "'''\n", 'parts/')


if __name__ == '__main__':
    with open(sys.argv[1], 'w', encoding='utf-8') as out:
        out.write(agent_source())
