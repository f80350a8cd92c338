"""Build step: embed the agent (zlib-compressed, as it is sent) and the stage-1
template into a C++ source file."""
import sys
import zlib

agent_path, stage1_path, out_path = sys.argv[1:4]
with open(agent_path, 'rb') as f:
    agent = f.read()
with open(stage1_path, 'rb') as f:
    stage1 = f.read()
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
