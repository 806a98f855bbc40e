// Log lines of the C++ core, sent to the sink set with refseg_log_set (csrc/api/log.cpp).
#pragma once

#include <string>

namespace refseg {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3 };

// Thread-safe; `message` is one line without a newline.
void log(LogLevel level, const std::string& message);

}  // namespace refseg
