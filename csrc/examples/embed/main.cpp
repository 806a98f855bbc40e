// README "Embedding from C++": prompts for one target from candidate points via the C API.
#include <cstdio>
#include <refseg.h>

int main() {
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
  return count == 4 ? 0 : 1;
}
