// docs/cpp.md "Embedding from C": links the installed refseg through find_package(refseg). Runs the
// prompt engine on a few points, and the documented segment_one() on a folder that is not an export
// (it must fail cleanly with REFSEG_ERR_ARTIFACT: no models are exported in this test).
#include <cstdio>
#include <refseg.h>

extern "C" int segment_one(const char* dir, refseg_image ref, refseg_image ref_mask, refseg_image target,
                           uint8_t* out);

int main(int argc, char** argv) {
  if (refseg_api_version() != REFSEG_API_VERSION) return 1;  // header and library agree
  refseg_prompt_params params = refseg_default_prompt_params();
  params.use_box = 1;
  const refseg_point pos[] = {{40, 42}, {44, 40}, {120, 96}};
  const refseg_point neg[] = {{200, 10}, {10, 230}, {46, 44}};
  refseg_point points[6];
  int32_t labels[6], count = 0;
  double box[4];
  refseg_status s = refseg_engineer_prompts(pos, 3, neg, 3, NULL, 0, /*height*/ 240, /*width*/ 320,
                                            &params, points, labels, 6, &count, box);
  if (s != REFSEG_OK) {
    std::fprintf(stderr, "refseg: %s: %s\n", refseg_status_string(s), refseg_last_error());
    return 1;
  }
  for (int i = 0; i < count; ++i) std::printf("(%g, %g) label %d\n", points[i].x, points[i].y, labels[i]);
  std::printf("box %g %g %g %g\n", box[0], box[1], box[2], box[3]);
  static uint8_t pixels[32 * 32 * 3], mask[32 * 32], out[32 * 32];
  const refseg_image im = {pixels, 32, 32, 3, 96}, mk = {mask, 32, 32, 1, 32};
  const char* dir = argc > 1 ? argv[1] : "no-such-export";
  const int rc = segment_one(dir, im, mk, im, out);  // expected to fail: not an export folder
  return count == 4 && rc == 1 ? 0 : 1;
}
