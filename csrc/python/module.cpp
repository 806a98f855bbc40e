// refseg._C: the C++ prompt engine for the Python pipeline (numpy in, numpy out, CPU).
// Called only through refseg.pipeline.native, which converts torch tensors and configs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "../core/prompt_engine.h"
#include "../include/refseg.h"
#include "../pipeline/resample.h"

namespace py = pybind11;
using namespace refseg;

namespace {

template <typename T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

void need_dims(const py::array& a, int dims, const char* name) {
  if (a.ndim() != dims)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(dims) + " dimensions, got " +
                                std::to_string(a.ndim()));
}

GridRule parse_rule(const std::string& rule) {
  if (rule == "all") return GridRule::All;
  if (rule == "any") return GridRule::Any;
  if (rule == "fraction") return GridRule::Fraction;
  throw std::invalid_argument("grid rule '" + rule + "' is not one of all, any, fraction");
}

py::array_t<int8_t> grid_labels(Arr<uint8_t> mask, const std::string& rule, double fraction, bool skip_last) {
  need_dims(mask, 3, "mask");
  const long k = mask.shape(0), s = mask.shape(1);
  if (mask.shape(2) != s || s % kPatchSize || s == 0)
    throw std::invalid_argument("mask must be (K, S, S) with S a multiple of 14");
  const long g = s / kPatchSize;
  const GridRule r = parse_rule(rule);
  py::array_t<int8_t> out({k, g, g});
  for (long i = 0; i < k; ++i) {
    const auto lab = binary_to_grid(mask.data() + i * s * s, static_cast<int>(s), s, r, fraction, skip_last);
    std::copy(lab.begin(), lab.end(), out.mutable_data() + i * g * g);
  }
  return out;
}

py::tuple match_nn(Arr<int64_t> fwd, Arr<int64_t> far, Arr<double> fwd_val, Arr<int64_t> bwd, Arr<int8_t> labels,
                   bool cosine, bool cycle_check, bool hard_negatives, bool fallback, bool offimage_quirk) {
  need_dims(fwd, 2, "fwd"), need_dims(far, 2, "far"), need_dims(fwd_val, 2, "fwd_val");
  need_dims(bwd, 2, "bwd"), need_dims(labels, 2, "labels");
  const long b = fwd.shape(0), nr = fwd.shape(1), nt = bwd.shape(1), c = labels.shape(0);
  if (far.shape(0) != b || far.shape(1) != nr || fwd_val.shape(0) != b || fwd_val.shape(1) != nr ||
      bwd.shape(0) != b || labels.shape(1) != nr)
    throw std::invalid_argument("match_nn: fwd/far/fwd_val (B, Nr), bwd (B, Nt), labels (C, Nr) disagree");
  MatchOptions opt{cosine, cycle_check, hard_negatives, fallback, offimage_quirk};
  py::array_t<bool> pos({b, c, nt}), neg({b, c, nt}), hard({b, c, nt}), off_pos({b, c}), off_neg({b, c});
  for (long i = 0; i < b; ++i) {
    const Candidates cand = match_candidates(fwd.data() + i * nr, far.data() + i * nr, fwd_val.data() + i * nr,
                                             bwd.data() + i * nt, static_cast<int>(nr), static_cast<int>(nt),
                                             labels.data(), static_cast<int>(c), opt);
    std::copy(cand.positives.begin(), cand.positives.end(), pos.mutable_data() + i * c * nt);
    std::copy(cand.negatives.begin(), cand.negatives.end(), neg.mutable_data() + i * c * nt);
    std::copy(cand.hard_negatives.begin(), cand.hard_negatives.end(), hard.mutable_data() + i * c * nt);
    std::copy(cand.offimage_pos.begin(), cand.offimage_pos.end(), off_pos.mutable_data() + i * c);
    std::copy(cand.offimage_neg.begin(), cand.offimage_neg.end(), off_neg.mutable_data() + i * c);
  }
  return py::make_tuple(pos, neg, hard, off_pos, off_neg);
}

std::vector<PointList> unpad(const Arr<double>& pts, const Arr<bool>& valid, long p, const char* name) {
  need_dims(pts, 3, name);
  need_dims(valid, 2, name);
  if (pts.shape(0) != p || pts.shape(2) != 2 || valid.shape(0) != p || valid.shape(1) != pts.shape(1))
    throw std::invalid_argument(std::string(name) + ": expected points (P, N, 2) and valid (P, N) for P=" +
                                std::to_string(p));
  const long n = pts.shape(1);
  std::vector<PointList> sets(p);
  for (long i = 0; i < p; ++i)
    for (long j = 0; j < n; ++j)
      if (valid.data()[i * n + j]) sets[i].push_back({pts.data()[(i * n + j) * 2], pts.data()[(i * n + j) * 2 + 1]});
  return sets;
}

py::tuple engineer_padded(Arr<double> pos, Arr<bool> pos_valid, Arr<double> neg, Arr<bool> neg_valid,
                          Arr<int64_t> sizes, const PromptOptions& opt, py::object hard, py::object hard_valid) {
  need_dims(sizes, 2, "sizes");
  const long p = sizes.shape(0);
  if (sizes.shape(1) != 2) throw std::invalid_argument("sizes: expected (P, 2) (H, W)");
  const auto ps = unpad(pos, pos_valid, p, "positives"), ns = unpad(neg, neg_valid, p, "negatives");
  std::vector<PointList> hs;
  const bool with_hard = !hard.is_none() && py::array(hard).shape(1) > 0;
  if (with_hard) hs = unpad(hard.cast<Arr<double>>(), hard_valid.cast<Arr<bool>>(), p, "hard_negatives");
  std::vector<PromptSet> sets(p);
  long width = 0;
  {
    py::gil_scoped_release nogil;
    for (long i = 0; i < p; ++i) {
      const long h = sizes.data()[2 * i], w = sizes.data()[2 * i + 1];
      sets[i] = engineer_set(ps[i], ns[i], with_hard ? &hs[i] : nullptr, static_cast<int>(h), static_cast<int>(w), opt);
      width = std::max<long>(width, static_cast<long>(sets[i].points.size()));
    }
  }
  py::array_t<double> points({p, width, 2L});
  py::array_t<int64_t> labels({p, width}), num(p);
  std::fill(points.mutable_data(), points.mutable_data() + points.size(), 0.0);
  std::fill(labels.mutable_data(), labels.mutable_data() + labels.size(), -1);
  for (long i = 0; i < p; ++i) {
    const PromptSet& s = sets[i];
    num.mutable_data()[i] = static_cast<int64_t>(s.points.size());
    for (size_t j = 0; j < s.points.size(); ++j) {
      points.mutable_data()[(i * width + j) * 2] = s.points[j].x;
      points.mutable_data()[(i * width + j) * 2 + 1] = s.points[j].y;
      labels.mutable_data()[i * width + j] = s.labels[j];
    }
  }
  py::object boxes = py::none();
  if (opt.use_box) {
    py::array_t<double> bx({p, 4L});
    for (long i = 0; i < p; ++i)
      for (int q = 0; q < 4; ++q)
        bx.mutable_data()[i * 4 + q] = sets[i].has_box ? sets[i].box[q] : std::numeric_limits<double>::quiet_NaN();
    boxes = bx;
  }
  return py::make_tuple(points, labels, num, boxes);
}

py::tuple kmeans_py(Arr<float> x, int k, int iters, int64_t seed, const std::string& init) {
  need_dims(x, 2, "points");
  if (init != "k-means++" && init != "first") throw std::invalid_argument("init must be 'k-means++' or 'first'");
  const KMeansResult r = kmeans(x.data(), static_cast<int>(x.shape(0)), static_cast<int>(x.shape(1)), k, iters,
                                seed, init == "k-means++");
  py::array_t<float> centres({static_cast<long>(k), static_cast<long>(x.shape(1))});
  std::copy(r.centres.begin(), r.centres.end(), centres.mutable_data());
  py::array_t<int64_t> labels(static_cast<long>(r.labels.size()));
  std::copy(r.labels.begin(), r.labels.end(), labels.mutable_data());
  return py::make_tuple(centres, labels);
}

py::array_t<uint8_t> resize_py(Arr<uint8_t> img, int out_w, int out_h, const std::string& filter) {
  need_dims(img, 3, "image");
  if (filter != "bicubic" && filter != "bilinear") throw std::invalid_argument("filter must be bicubic or bilinear");
  const int h = static_cast<int>(img.shape(0)), w = static_cast<int>(img.shape(1)), c = static_cast<int>(img.shape(2));
  const auto out = resize_like_pil(img.data(), w, h, c, static_cast<long>(w) * c, out_w, out_h,
                                   filter == "bicubic" ? Filter::Bicubic : Filter::Bilinear);
  py::array_t<uint8_t> arr({static_cast<long>(out_h), static_cast<long>(out_w), static_cast<long>(c)});
  std::copy(out.begin(), out.end(), arr.mutable_data());
  return arr;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "refseg C++ prompt engine (see refseg.pipeline.native)";
  m.attr("api_version") = REFSEG_API_VERSION;
  py::class_<PromptOptions>(m, "PromptOptions")
      .def(py::init<>())
      .def_readwrite("offimage_quirk", &PromptOptions::offimage_quirk)
      .def_readwrite("radius_side", &PromptOptions::radius_side)
      .def_readwrite("pos_radius", &PromptOptions::pos_radius)
      .def_readwrite("neg_radius", &PromptOptions::neg_radius)
      .def_readwrite("exclusion_radius", &PromptOptions::exclusion_radius)
      .def_readwrite("hard_radius", &PromptOptions::hard_radius)
      .def_readwrite("kmeans_k", &PromptOptions::kmeans_k)
      .def_readwrite("kmeans_iters", &PromptOptions::kmeans_iters)
      .def_readwrite("kmeans_seed", &PromptOptions::kmeans_seed)
      .def_readwrite("max_points", &PromptOptions::max_points)
      .def_readwrite("fallback", &PromptOptions::fallback)
      .def_readwrite("use_box", &PromptOptions::use_box);
  m.def("grid_labels", &grid_labels, "(K, S, S) uint8 masks -> (K, G, G) int8 labels",
        py::arg("mask"), py::arg("rule"), py::arg("fraction"), py::arg("skip_last"));
  m.def("match_nn", &match_nn, "nearest-neighbour match indices -> candidate masks (B, C, Nt)",
        py::arg("fwd"), py::arg("far"), py::arg("fwd_val"), py::arg("bwd"), py::arg("labels"), py::arg("cosine"),
        py::arg("cycle_check"), py::arg("hard_negatives"), py::arg("fallback"), py::arg("offimage_quirk"));
  m.def("engineer_padded", &engineer_padded, "padded candidate sets -> (points, labels, num_points, boxes)",
        py::arg("pos"), py::arg("pos_valid"), py::arg("neg"), py::arg("neg_valid"), py::arg("sizes"),
        py::arg("options"), py::arg("hard") = py::none(), py::arg("hard_valid") = py::none());
  m.def("resize_like_pil", &resize_py, "(H, W, C) uint8 -> (out_h, out_w, C) uint8, Pillow's resampling",
        py::arg("image"), py::arg("out_w"), py::arg("out_h"), py::arg("filter"));
  m.def("kmeans", &kmeans_py, "k-means of (n, d) float32 points -> (centres (k, d), labels (n,))",
        py::arg("points"), py::arg("k"), py::arg("iters"), py::arg("seed"), py::arg("init"));
}
