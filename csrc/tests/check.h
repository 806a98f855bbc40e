// Minimal test harness: CHECK(cond) records a failure with its line; main returns the failure count.
#pragma once
#include <cstdio>

static int g_failures = 0;
#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                              \
    }                                                                            \
  } while (0)
#define SKIP_RETURN_CODE 77
