# SSH benchmark against the loopback sshd (needs root and openssh-server). Included
# from tests/bench/CMakeLists.txt: include(${CMAKE_CURRENT_SOURCE_DIR}/ssh.cmake)
add_executable(bench_ssh ${CMAKE_CURRENT_LIST_DIR}/bench_ssh.cpp)
target_include_directories(bench_ssh PRIVATE ${CMAKE_CURRENT_LIST_DIR}/../core/context/ssh)
target_compile_definitions(bench_ssh PRIVATE
  MITOGEN_SSHD_FIXTURE="${CMAKE_CURRENT_LIST_DIR}/../core/context/ssh/sshd_fixture.py"
  MITOGEN_PYTHON="${Python_EXECUTABLE}")
target_link_libraries(bench_ssh PRIVATE mitogen_core mitogen_warnings)
