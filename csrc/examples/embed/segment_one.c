/* README "Embedding from C++": this file's body is the README's example, verbatim
 * (tests/test_cpp_pipeline.py checks they stay equal). */
#include <stdio.h>
#include <refseg.h>
int segment_one(const char* dir, refseg_image ref, refseg_image ref_mask, refseg_image target, uint8_t* out) {
  refseg_params params = refseg_default_params();      /* the "sat" preset */
  params.num_threads = 2;
  refseg_engine* engine = NULL;
  refseg_status s = refseg_engine_create(dir, &params, &engine);
  if (s != REFSEG_OK) {
    fprintf(stderr, "%s: %s\n", refseg_status_string(s), refseg_last_error(NULL));
    return 1;
  }
  s = refseg_set_reference(engine, &ref, &ref_mask);   /* images: data, width, height, channels, stride */
  if (s == REFSEG_OK)
    s = refseg_segment(engine, &target, out, target.width);  /* out: height x width, 255 = foreground */
  if (s != REFSEG_OK) fprintf(stderr, "%s: %s\n", refseg_status_string(s), refseg_last_error(engine));
  refseg_engine_free(engine);
  return s == REFSEG_OK ? 0 : 1;
}
