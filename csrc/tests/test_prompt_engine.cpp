// The C++ prompt engine, through the C API, against results written by the Python (torch) path:
//   test_prompt_engine golden <gbmseg_example dir>   the GBMSeg release's final list, 57/29 exact
//   test_prompt_engine fixtures <file>               cases written by write_fixtures.py
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "check.h"
#include "refseg.h"

namespace {

std::vector<refseg_point> parse_list(const std::string& text) {  // "[[x, y], [x, y]]"
  std::vector<refseg_point> out;
  std::vector<double> nums;
  std::string num;
  for (char ch : text + " ") {
    if ((ch >= '0' && ch <= '9') || ch == '-' || ch == '.') {
      num += ch;
    } else if (!num.empty()) {
      nums.push_back(std::atof(num.c_str()));
      num.clear();
    }
  }
  for (size_t i = 0; i + 1 < nums.size(); i += 2) out.push_back({nums[i], nums[i + 1]});
  return out;
}

bool read_prompt_file(const std::string& path, std::vector<refseg_point>& pos, std::vector<refseg_point>& neg) {
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return false;
  const size_t a = line.find(';'), b = line.find(';', a + 1);
  if (a == std::string::npos || b == std::string::npos) return false;
  pos = parse_list(line.substr(a + 1, b - a - 1));
  neg = parse_list(line.substr(b + 1));
  return true;
}

int golden(const std::string& dir) {
  std::vector<refseg_point> pos, neg, unused, hard, final_pos, final_neg;
  if (!read_prompt_file(dir + "/prompt_initial.txt", pos, neg)) {
    std::cerr << "golden data " << dir << " is absent: skipped\n";
    return SKIP_RETURN_CODE;
  }
  CHECK(read_prompt_file(dir + "/prompt_hard.txt", unused, hard));
  CHECK(read_prompt_file(dir + "/prompt_final.txt", final_pos, final_neg));
  CHECK(pos.size() == 57 && neg.size() == 334 && hard.size() == 35);
  // the gbmseg preset with the release's off-image point kept
  refseg_prompt_params p = refseg_default_prompt_params();
  p.gbmseg_offimage_quirk = 1;
  p.radius_in_pixels = 1;
  p.pos_radius = 0, p.neg_radius = 64, p.exclusion_radius = 128, p.hard_radius = 64;
  p.kmeans_k = 0, p.fallback = 0;
  std::vector<refseg_point> out(pos.size() + neg.size() + hard.size());
  std::vector<int32_t> labels(out.size());
  int32_t count = 0;
  CHECK(refseg_engineer_prompts(pos.data(), (int32_t)pos.size(), neg.data(), (int32_t)neg.size(), hard.data(),
                                (int32_t)hard.size(), 512, 512, &p, out.data(), labels.data(), (int32_t)out.size(),
                                &count, nullptr) == REFSEG_OK);
  CHECK(count == 57 + 29);
  for (int32_t i = 0; i < count && i < 86; ++i) {
    const refseg_point& want = i < 57 ? final_pos[i] : final_neg[i - 57];
    CHECK(labels[i] == (i < 57 ? 1 : 0));
    CHECK(out[i].x == want.x && out[i].y == want.y);
  }
  return g_failures ? 1 : 0;
}

double num(std::istream& in) {  // strtod reads what Python's repr writes, "nan" included
  std::string tok;
  in >> tok;
  return std::strtod(tok.c_str(), nullptr);
}

std::vector<refseg_point> read_points(std::istream& in) {
  long n;
  in >> n;
  std::vector<refseg_point> pts(n < 0 ? 0 : n);
  for (auto& q : pts) q.x = num(in), q.y = num(in);
  return pts;
}

int fixtures(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    std::cerr << "fixture file " << path << " is missing (written by write_fixtures.py)\n";
    return 1;
  }
  std::string tag;
  int cases = 0, grids = 0;
  while (in >> tag) {
    if (tag == "prompt") {
      std::string name;
      refseg_prompt_params p = refseg_default_prompt_params();
      int32_t h, w;
      in >> name >> p.gbmseg_offimage_quirk >> p.radius_in_pixels;
      p.pos_radius = num(in), p.neg_radius = num(in), p.exclusion_radius = num(in), p.hard_radius = num(in);
      in >> p.kmeans_k >> p.kmeans_iters >> p.kmeans_seed >> p.max_points >> p.fallback >> p.use_box >> h >> w;
      int has_hard;
      const auto pos = read_points(in), neg = read_points(in);
      in >> has_hard;
      const auto hard = read_points(in);
      long n;
      in >> n;
      std::vector<refseg_point> want(n);
      std::vector<int32_t> want_labels(n);
      for (long i = 0; i < n; ++i) want[i].x = num(in), want[i].y = num(in), in >> want_labels[i];
      double want_box[4];
      for (double& v : want_box) v = num(in);
      std::vector<refseg_point> out(pos.size() + neg.size() + hard.size() + 1);
      std::vector<int32_t> labels(out.size());
      int32_t count = -1;
      double box[4];
      const refseg_status s = refseg_engineer_prompts(
          pos.data(), (int32_t)pos.size(), neg.data(), (int32_t)neg.size(), has_hard ? hard.data() : nullptr,
          (int32_t)hard.size(), h, w, &p, out.data(), labels.data(), (int32_t)out.size(), &count, box);
      CHECK(s == REFSEG_OK);
      const int before = g_failures;
      CHECK(count == n);
      for (long i = 0; i < n && i < count; ++i) {
        CHECK(out[i].x == want[i].x && out[i].y == want[i].y);
        CHECK(labels[i] == want_labels[i]);
      }
      if (p.use_box)
        for (int q = 0; q < 4; ++q) CHECK((std::isnan(box[q]) && std::isnan(want_box[q])) || box[q] == want_box[q]);
      if (g_failures != before) std::cerr << "  in case " << name << "\n";
      ++cases;
    } else if (tag == "grid") {
      refseg_prompt_params p = refseg_default_prompt_params();
      int side, patch, rule;
      in >> side >> patch >> rule;
      p.patch_size = patch;
      p.grid_fraction = num(in);
      in >> p.gbmseg_skip_last;
      p.grid_rule = rule;
      std::string bits;
      in >> bits;
      std::vector<uint8_t> mask(bits.size());
      for (size_t i = 0; i < bits.size(); ++i) mask[i] = bits[i] == '1' ? 255 : 0;
      const int g = side / patch;
      std::vector<int> want(g * g);
      for (int& v : want) in >> v;
      std::vector<int8_t> got(g * g);
      CHECK(mask.size() == size_t(side) * side);
      CHECK(refseg_grid_labels(mask.data(), side, side, &p, got.data()) == REFSEG_OK);
      for (int i = 0; i < g * g; ++i) CHECK(got[i] == want[i]);
      ++grids;
    } else {
      std::cerr << "unknown fixture tag " << tag << "\n";
      return 1;
    }
  }
  std::cout << cases << " prompt cases, " << grids << " grid cases\n";
  CHECK(cases >= 10 && grids >= 6);
  return g_failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: test_prompt_engine golden <dir> | fixtures <file>\n";
    return 2;
  }
  const std::string mode = argv[1];
  if (mode == "golden") return golden(argv[2]);
  if (mode == "fixtures") return fixtures(argv[2]);
  std::cerr << "unknown mode " << mode << "\n";
  return 2;
}
