"""Build step: embed the agent (its parts joined by core/agent/build_agent.py,
zlib-compressed, as it is sent) and the stage-1 template into a C++ source file.

    embed_agent.py AGENT_DIR OUT_CPP
"""
import sys
import zlib

agent_dir, out_path = sys.argv[1:3]
sys.path.insert(0, agent_dir)
import build_agent  # noqa: E402

agent = build_agent.agent_source(agent_dir).encode('utf-8')
stage1 = build_agent.stage1_source(agent_dir).encode('utf-8')
compressed = zlib.compress(agent, 9)


def c_array(data):
    lines = []
    for i in range(0, len(data), 20):
        lines.append(','.join(str(b) for b in data[i:i + 20]))
    return ',\n'.join(lines)


with open(out_path, 'w') as out:
    out.write('// Generated from core/agent by core/cmake/embed_agent.py. Do not edit.\n')
    out.write('#include <cstddef>\n\nnamespace mitogen::detail {\n')
    out.write('extern const unsigned char agent_z[] = {\n%s\n};\n' % c_array(compressed))
    out.write('extern const std::size_t agent_z_len = %d;\n' % len(compressed))
    out.write('extern const unsigned char stage1_src[] = {\n%s,0\n};\n' % c_array(stage1))
    out.write('extern const std::size_t stage1_len = %d;\n' % len(stage1))
    out.write('}  // namespace mitogen::detail\n')
