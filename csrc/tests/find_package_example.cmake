# ctest script: install this build into a scratch prefix, then configure, build and run
# csrc/examples/embed (docs/cpp.md "Embedding from C") against it with find_package(refseg).
set(prefix "${BUILD_DIR}/find_package_example/prefix")
set(work "${BUILD_DIR}/find_package_example/build")
file(REMOVE_RECURSE "${prefix}" "${work}")
include("${CMAKE_CURRENT_LIST_DIR}/run.cmake")
run("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}/csrc/examples/embed" -B "${work}" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${prefix}")
run("${CMAKE_COMMAND}" --build "${work}")
run("${work}/embed")
