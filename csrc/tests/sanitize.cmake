# ctest script: configure and build the C API tests and the threads example with -DREFSEG_SANITIZE=SANITIZER
# (address: AddressSanitizer + UBSan + LeakSanitizer; thread: ThreadSanitizer) in BUILD_DIR, then run them on MODEL
# (an AOTInductor export). LibTorch is not instrumented: what is checked is refseg's own code and its use of
# LibTorch (our calls, buffers, threads and locks); lsan.supp and tsan.supp name the reports that come from inside it.
#   cmake -DSOURCE_DIR=... -DBUILD_DIR=... -DSANITIZER=address|thread -DMODEL=... -DGENERATOR=...
#         -DPython3_EXECUTABLE=... -P sanitize.cmake
include("${CMAKE_CURRENT_LIST_DIR}/run.cmake")
string(TIMESTAMP t0 "%s")
# -O1, little debug information: a short build on a small machine, still readable stacks
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BUILD_DIR}" -G "${GENERATOR}" -DREFSEG_SANITIZE=${SANITIZER}
    -DCMAKE_BUILD_TYPE=None "-DCMAKE_CXX_FLAGS=-O1 -g1" "-DCMAKE_C_FLAGS=-O1 -g1"
    -DPython3_EXECUTABLE=${Python3_EXECUTABLE})
run("${CMAKE_COMMAND}" --build "${BUILD_DIR}" --parallel 2 --target test_c_api test_model_api refseg-threads)
string(TIMESTAMP t1 "%s")
set(supp "${SOURCE_DIR}/csrc/tests/sanitizers.supp")
if(SANITIZER STREQUAL "address")
  # intercept_tls_get_addr=0: GCC 12's LeakSanitizer misreads glibc 2.36's dynamic TLS records (it scanned a
  # "DTLS" range starting at 0x5bad2 and its tracer died with SIGSEGV at exit, depending only on memory layout);
  # static TLS, stacks and the heap are still scanned
  set(ENV{ASAN_OPTIONS} "detect_leaks=1:abort_on_error=0:halt_on_error=1:intercept_tls_get_addr=0")
  set(ENV{LSAN_OPTIONS} "suppressions=${SOURCE_DIR}/csrc/tests/lsan.supp:print_suppressions=0")
  set(ENV{UBSAN_OPTIONS} "print_stacktrace=1:halt_on_error=1")
  run("${BUILD_DIR}/csrc/tests/test_c_api")
else()
  set(ENV{TSAN_OPTIONS} "halt_on_error=1:second_deadlock_stack=1:suppressions=${SOURCE_DIR}/csrc/tests/tsan.supp")
endif()
run("${BUILD_DIR}/csrc/tests/test_model_api" "${BUILD_DIR}" "${MODEL}")
run("${BUILD_DIR}/refseg-threads" -t 4 -n 1 "${MODEL}")
string(TIMESTAMP t2 "%s")
math(EXPR build_s "${t1} - ${t0}")
math(EXPR run_s "${t2} - ${t1}")
message(STATUS "${SANITIZER} sanitizer: configure + build ${build_s} s, tests ${run_s} s")
