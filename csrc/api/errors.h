// Per-thread last-error string of the C API and the guard that turns C++ exceptions into codes.
#pragma once

#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "refseg.h"

namespace refseg {

// An argument the caller got wrong: REFSEG_ERR_INVALID_ARGUMENT (or the code given).
struct ApiError : std::runtime_error {
  refseg_status status;
  ApiError(refseg_status s, const std::string& msg) : std::runtime_error(msg), status(s) {}
};

void set_last_error(const std::string& message);
const std::string& thread_last_error();

template <typename F>
refseg_status guarded(const char* where, F&& body) {
  try {
    body();
    return REFSEG_OK;
  } catch (const ApiError& e) {
    set_last_error(std::string(where) + ": " + e.what());
    return e.status;
  } catch (const std::invalid_argument& e) {
    set_last_error(std::string(where) + ": " + e.what());
    return REFSEG_ERR_INVALID_ARGUMENT;
  } catch (const std::bad_alloc&) {
    set_last_error(std::string(where) + ": out of memory");
    return REFSEG_ERR_INTERNAL;
  } catch (const std::exception& e) {
    set_last_error(std::string(where) + ": " + e.what());
    return REFSEG_ERR_INTERNAL;
  } catch (...) {
    set_last_error(std::string(where) + ": unknown error");
    return REFSEG_ERR_INTERNAL;
  }
}

inline void require(bool ok, const std::string& message, refseg_status s = REFSEG_ERR_INVALID_ARGUMENT) {
  if (!ok) throw ApiError(s, message);
}

}  // namespace refseg
