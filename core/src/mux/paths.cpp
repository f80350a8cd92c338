#include "mitogen/mux/paths.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "mitogen/errors.hpp"

namespace mitogen::mux {

std::string private_dir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string base = tmp && *tmp ? tmp : "/tmp";
  while (base.size() > 1 && base.back() == '/') base.pop_back();
  return base + "/mitogen-" + std::to_string(::geteuid());
}

std::string install_tag(const std::string& install_dir) {
  char* real = ::realpath(install_dir.c_str(), nullptr);
  std::string path = real ? real : install_dir;
  std::free(real);
  std::uint32_t h = 0x811c9dc5u;
  for (unsigned char c : path) h = (h ^ c) * 0x01000193u;
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", h);
  return buf;
}

std::string default_socket_path(const std::string& install_dir) {
  if (const char* s = std::getenv(socket_env); s && *s) return s;
  return private_dir() + "/mux-" + install_tag(install_dir) + ".sock";
}

std::string lock_path(const std::string& socket_path) { return socket_path + ".lock"; }

std::string default_log_path() { return private_dir() + "/mux.log"; }

std::string check_private_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    return "cannot create " + dir + ": " + std::strerror(errno);
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) return "cannot stat " + dir + ": " + std::strerror(errno);
  if (!S_ISDIR(st.st_mode)) return dir + " is not a directory";
  if (st.st_uid != ::geteuid())
    return dir + " belongs to uid " + std::to_string(st.st_uid) + ", not to us (uid " + std::to_string(::geteuid()) + ")";
  if (st.st_mode & 077) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%03o", static_cast<unsigned>(st.st_mode & 0777));
    return dir + " is open to other users (mode " + mode + "; it must be 700)";
  }
  return "";
}

std::unique_ptr<instance_lock> instance_lock::try_acquire(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw error("mitogen-mux: cannot open the lock file " + path + ": " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    ::close(fd);
    if (e == EWOULDBLOCK) return nullptr;
    throw error("mitogen-mux: cannot lock " + path + ": " + std::strerror(e));
  }
  auto lock = std::unique_ptr<instance_lock>(new instance_lock(fd));
  lock->update_pid();
  return lock;
}

void instance_lock::update_pid() {
  std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) == 0) (void)!::pwrite(fd_, pid.data(), pid.size(), 0);
}

instance_lock::~instance_lock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

}  // namespace mitogen::mux
