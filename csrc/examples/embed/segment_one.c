/* docs/cpp.md "Embedding from C": this file's body is the example there, verbatim
 * (tests/test_cpp_prompts.py checks they stay equal). */
#include <stdio.h>
#include <refseg.h>
int segment_one(const char* dir, refseg_image ref, refseg_image ref_mask, refseg_image target, uint8_t* labels) {
  refseg_params params = refseg_default_params();  /* the "sat" preset; refseg_preset_params for others */
  params.num_threads = 2;
  refseg_model* model = NULL;                      /* loaded once, shared read-only by the threads */
  refseg_status s = refseg_model_load(dir, &params, &model);
  if (s != REFSEG_OK) {
    fprintf(stderr, "%s: %s\n", refseg_status_string(s), refseg_last_error());
    return 1;
  }
  refseg_context* ctx = NULL;                      /* one per thread */
  s = refseg_context_create(model, &ctx);
  if (s == REFSEG_OK)  /* images: data, width, height, channels, stride; mask values are classes (n-shot: repeat) */
    s = refseg_context_set_reference(ctx, &ref, &ref_mask);
  if (s == REFSEG_OK)  /* labels: height x width class values, 0 = background */
    s = refseg_context_segment(ctx, &target, labels, target.width);
  if (s != REFSEG_OK) fprintf(stderr, "%s: %s\n", refseg_status_string(s), refseg_last_error());
  refseg_context_free(ctx);
  refseg_model_free(model);
  return s == REFSEG_OK ? 0 : 1;
}
