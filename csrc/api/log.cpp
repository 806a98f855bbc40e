// refseg_log_set and the core's log lines (pipeline/log.h): one process-wide sink, WARN and ERROR to stderr by
// default. The sink is called under a (recursive) lock: calls from several threads are serialised, and once
// refseg_log_set returns no thread is still inside the previous callback, so its user data may be released.
#include <cstdio>
#include <mutex>

#include "../pipeline/log.h"
#include "refseg.h"

namespace refseg {

namespace {
std::recursive_mutex g_mutex;
refseg_log_callback g_callback = nullptr;
void* g_user_data = nullptr;
}  // namespace

void log(LogLevel level, const std::string& message) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (g_callback)
    g_callback(static_cast<refseg_log_level>(level), message.c_str(), g_user_data);
  else if (level >= LogLevel::Warn)
    std::fprintf(stderr, "refseg: %s: %s\n", level == LogLevel::Warn ? "warning" : "error", message.c_str());
}

}  // namespace refseg

extern "C" void refseg_log_set(refseg_log_callback callback, void* user_data) {
  std::lock_guard<std::recursive_mutex> lock(refseg::g_mutex);
  refseg::g_callback = callback;
  refseg::g_user_data = user_data;
}
