// refseg._C: numpy bindings of the C API (csrc/include/refseg.h) for refseg's Python pipeline: the prompt
// engine, Pillow-exact resampling, mask cleaning and the presets, each a loop of C API calls. Built by setup.py
// from the C API sources without LibTorch (the model calls of the C API need the CMake library `refseg`).
// Called only through refseg.pipeline.native, which converts torch tensors and configs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#include "refseg.h"

namespace py = pybind11;

namespace {

template <typename T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

// a failing C API call -> ValueError (bad argument) or RuntimeError, with the library's message
void check(refseg_status s) {
  if (s == REFSEG_OK) return;
  const std::string message = refseg_last_error();
  if (s == REFSEG_ERR_INVALID_ARGUMENT || s == REFSEG_ERR_BUFFER_TOO_SMALL) throw std::invalid_argument(message);
  throw std::runtime_error(std::string(refseg_status_string(s)) + ": " + message);
}

void need_dims(const py::array& a, int dims, const char* name) {
  if (a.ndim() != dims)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(dims) + " dimensions, got " +
                                std::to_string(a.ndim()));
}

int32_t grid_rule(const std::string& rule) {
  if (rule == "all") return REFSEG_GRID_ALL;
  if (rule == "any") return REFSEG_GRID_ANY;
  if (rule == "fraction") return REFSEG_GRID_FRACTION;
  throw std::invalid_argument("grid rule '" + rule + "' is not one of all, any, fraction");
}

py::array_t<int8_t> grid_labels(Arr<uint8_t> mask, const std::string& rule, double fraction, bool skip_last,
                                int patch_size) {
  need_dims(mask, 3, "mask");
  const py::ssize_t k = mask.shape(0), s = mask.shape(1);
  if (patch_size <= 0 || mask.shape(2) != s || s % patch_size || s == 0)
    throw std::invalid_argument("mask must be (K, S, S) with S a multiple of the patch size " +
                                std::to_string(patch_size));
  refseg_prompt_params p = refseg_default_prompt_params();
  p.patch_size = patch_size;
  p.grid_rule = grid_rule(rule);
  p.grid_fraction = fraction;
  p.gbmseg_skip_last = skip_last;
  const py::ssize_t g = s / patch_size;
  py::array_t<int8_t> out({k, g, g});
  for (py::ssize_t i = 0; i < k; ++i)
    check(refseg_grid_labels(mask.data() + i * s * s, static_cast<int32_t>(s), s, &p, out.mutable_data() + i * g * g));
  return out;
}

py::tuple match_nn(Arr<int64_t> fwd, Arr<int64_t> far, Arr<double> fwd_val, Arr<int64_t> bwd, Arr<int8_t> labels,
                   bool cosine, bool cycle_check, bool hard_negatives, bool fallback, bool offimage_quirk) {
  need_dims(fwd, 2, "fwd"), need_dims(far, 2, "far"), need_dims(fwd_val, 2, "fwd_val");
  need_dims(bwd, 2, "bwd"), need_dims(labels, 2, "labels");
  const py::ssize_t b = fwd.shape(0), nr = fwd.shape(1), nt = bwd.shape(1), c = labels.shape(0);
  if (far.shape(0) != b || far.shape(1) != nr || fwd_val.shape(0) != b || fwd_val.shape(1) != nr ||
      bwd.shape(0) != b || labels.shape(1) != nr)
    throw std::invalid_argument("match_nn: fwd/far/fwd_val (B, Nr), bwd (B, Nt), labels (C, Nr) disagree");
  refseg_params p = refseg_default_params();
  p.metric_euclidean = !cosine;
  p.cycle_check = cycle_check;
  p.hard_negatives = hard_negatives;
  p.prompts.fallback = fallback;
  p.prompts.gbmseg_offimage_quirk = offimage_quirk;
  py::array_t<bool> pos({b, c, nt}), neg({b, c, nt}), hard({b, c, nt}), off_pos({b, c}), off_neg({b, c});
  static_assert(sizeof(bool) == sizeof(uint8_t), "numpy bool arrays are read as bytes");
  for (py::ssize_t i = 0; i < b; ++i)
    check(refseg_match_candidates(
        fwd.data() + i * nr, far.data() + i * nr, fwd_val.data() + i * nr, bwd.data() + i * nt,
        static_cast<int32_t>(nr), static_cast<int32_t>(nt), labels.data(), static_cast<int32_t>(c), &p,
        reinterpret_cast<uint8_t*>(pos.mutable_data() + i * c * nt), reinterpret_cast<uint8_t*>(neg.mutable_data() + i * c * nt),
        reinterpret_cast<uint8_t*>(hard.mutable_data() + i * c * nt), reinterpret_cast<uint8_t*>(off_pos.mutable_data() + i * c),
        reinterpret_cast<uint8_t*>(off_neg.mutable_data() + i * c)));
  return py::make_tuple(pos, neg, hard, off_pos, off_neg);
}

// (P, N, 2) points + (P, N) validity -> P lists of refseg_point
std::vector<std::vector<refseg_point>> unpad(const Arr<double>& pts, const Arr<bool>& valid, py::ssize_t p,
                                             const char* name) {
  need_dims(pts, 3, name);
  need_dims(valid, 2, name);
  if (pts.shape(0) != p || pts.shape(2) != 2 || valid.shape(0) != p || valid.shape(1) != pts.shape(1))
    throw std::invalid_argument(std::string(name) + ": expected points (P, N, 2) and valid (P, N) for P=" +
                                std::to_string(p));
  const py::ssize_t n = pts.shape(1);
  std::vector<std::vector<refseg_point>> sets(static_cast<size_t>(p));
  for (py::ssize_t i = 0; i < p; ++i)
    for (py::ssize_t j = 0; j < n; ++j)
      if (valid.data()[i * n + j]) sets[i].push_back({pts.data()[(i * n + j) * 2], pts.data()[(i * n + j) * 2 + 1]});
  return sets;
}

py::tuple engineer_padded(Arr<double> pos, Arr<bool> pos_valid, Arr<double> neg, Arr<bool> neg_valid,
                          Arr<int64_t> sizes, const refseg_prompt_params& params, py::object hard,
                          py::object hard_valid) {
  need_dims(sizes, 2, "sizes");
  const py::ssize_t p = sizes.shape(0);
  if (sizes.shape(1) != 2) throw std::invalid_argument("sizes: expected (P, 2) (H, W)");
  const auto ps = unpad(pos, pos_valid, p, "positives"), ns = unpad(neg, neg_valid, p, "negatives");
  std::vector<std::vector<refseg_point>> hs;
  const bool with_hard = !hard.is_none() && py::array(hard).shape(1) > 0;
  if (with_hard) hs = unpad(hard.cast<Arr<double>>(), hard_valid.cast<Arr<bool>>(), p, "hard_negatives");
  std::vector<std::vector<refseg_point>> points(static_cast<size_t>(p));
  std::vector<std::vector<int32_t>> labels(static_cast<size_t>(p));
  std::vector<std::array<double, 4>> boxes(static_cast<size_t>(p));
  std::vector<refseg_status> status(static_cast<size_t>(p), REFSEG_OK);
  std::vector<std::string> errors(static_cast<size_t>(p));
  const refseg_point none{0, 0};  // a non-NULL list of 0 hard negatives: "a list, empty"
  {
    py::gil_scoped_release nogil;
    for (py::ssize_t i = 0; i < p; ++i) {
      const auto& hv = with_hard ? hs[i] : std::vector<refseg_point>();
      const size_t cap = ps[i].size() + ns[i].size() + hv.size();
      points[i].resize(cap);
      labels[i].resize(cap);
      int32_t count = 0;
      status[i] = refseg_engineer_prompts(
          ps[i].data(), static_cast<int32_t>(ps[i].size()), ns[i].data(), static_cast<int32_t>(ns[i].size()),
          with_hard ? (hv.empty() ? &none : hv.data()) : nullptr, static_cast<int32_t>(hv.size()),
          static_cast<int32_t>(sizes.data()[2 * i]), static_cast<int32_t>(sizes.data()[2 * i + 1]), &params,
          points[i].data(), labels[i].data(), static_cast<int32_t>(cap), &count, boxes[i].data());
      if (status[i] != REFSEG_OK) {
        errors[i] = refseg_last_error();
        break;
      }
      points[i].resize(static_cast<size_t>(count));
      labels[i].resize(static_cast<size_t>(count));
    }
  }
  for (py::ssize_t i = 0; i < p; ++i)
    if (status[i] != REFSEG_OK) throw std::invalid_argument("prompt set " + std::to_string(i) + ": " + errors[i]);
  py::ssize_t width = 0;
  for (const auto& s : points) width = std::max(width, static_cast<py::ssize_t>(s.size()));
  py::array_t<double> out_points({p, width, static_cast<py::ssize_t>(2)});
  py::array_t<int64_t> out_labels({p, width}), num(p);
  std::fill(out_points.mutable_data(), out_points.mutable_data() + out_points.size(), 0.0);
  std::fill(out_labels.mutable_data(), out_labels.mutable_data() + out_labels.size(), -1);
  for (py::ssize_t i = 0; i < p; ++i) {
    num.mutable_data()[i] = static_cast<int64_t>(points[i].size());
    for (size_t j = 0; j < points[i].size(); ++j) {
      out_points.mutable_data()[(i * width + j) * 2] = points[i][j].x;
      out_points.mutable_data()[(i * width + j) * 2 + 1] = points[i][j].y;
      out_labels.mutable_data()[i * width + j] = labels[i][j];
    }
  }
  py::object out_boxes = py::none();
  if (params.use_box) {
    py::array_t<double> bx({p, static_cast<py::ssize_t>(4)});
    for (py::ssize_t i = 0; i < p; ++i) std::copy(boxes[i].begin(), boxes[i].end(), bx.mutable_data() + i * 4);
    out_boxes = bx;
  }
  return py::make_tuple(out_points, out_labels, num, out_boxes);
}

py::tuple kmeans(Arr<float> x, int k, int iters, int64_t seed, const std::string& init) {
  need_dims(x, 2, "points");
  if (init != "k-means++" && init != "first") throw std::invalid_argument("init must be 'k-means++' or 'first'");
  const auto n = static_cast<int32_t>(x.shape(0)), d = static_cast<int32_t>(x.shape(1));
  py::array_t<float> centres({static_cast<py::ssize_t>(k), static_cast<py::ssize_t>(d)});
  py::array_t<int64_t> labels(static_cast<py::ssize_t>(n));
  check(refseg_kmeans(x.data(), n, d, k, iters, seed, init == "k-means++", centres.mutable_data(),
                      labels.mutable_data()));
  return py::make_tuple(centres, labels);
}

py::array_t<uint8_t> resize(Arr<uint8_t> img, int out_w, int out_h, const std::string& filter) {
  need_dims(img, 3, "image");
  if (filter != "bicubic" && filter != "bilinear") throw std::invalid_argument("filter must be bicubic or bilinear");
  const auto h = static_cast<int32_t>(img.shape(0)), w = static_cast<int32_t>(img.shape(1)),
             c = static_cast<int32_t>(img.shape(2));
  const refseg_image src{img.data(), w, h, c, static_cast<int64_t>(w) * c};
  py::array_t<uint8_t> out({static_cast<py::ssize_t>(out_h), static_cast<py::ssize_t>(out_w), static_cast<py::ssize_t>(c)});
  check(refseg_resize(&src, out_w, out_h, filter == "bicubic" ? REFSEG_FILTER_BICUBIC : REFSEG_FILTER_BILINEAR,
                      out.mutable_data(), static_cast<int64_t>(out_w) * c));
  return out;
}

py::array_t<bool> clean_mask(Arr<uint8_t> mask, bool keep_largest, double min_component_fraction, bool fill_holes) {
  need_dims(mask, 2, "mask");
  const auto h = static_cast<int32_t>(mask.shape(0)), w = static_cast<int32_t>(mask.shape(1));
  py::array_t<bool> out({static_cast<py::ssize_t>(h), static_cast<py::ssize_t>(w)});
  auto* bytes = reinterpret_cast<uint8_t*>(out.mutable_data());
  std::copy(mask.data(), mask.data() + mask.size(), bytes);
  check(refseg_clean_mask(bytes, w, h, w, keep_largest, min_component_fraction, fill_holes));
  return out;
}

// refseg_params as a dict of its method fields (prompt fields under their own names)
py::dict params_dict(const refseg_params& p) {
  py::dict d;
  const refseg_prompt_params& q = p.prompts;
  d["patch_size"] = q.patch_size, d["grid_rule"] = q.grid_rule, d["grid_fraction"] = q.grid_fraction;
  d["gbmseg_skip_last"] = q.gbmseg_skip_last;
  d["gbmseg_offimage_quirk"] = q.gbmseg_offimage_quirk, d["radius_in_pixels"] = q.radius_in_pixels;
  d["pos_radius"] = q.pos_radius, d["neg_radius"] = q.neg_radius, d["exclusion_radius"] = q.exclusion_radius;
  d["hard_radius"] = q.hard_radius, d["kmeans_k"] = q.kmeans_k, d["kmeans_iters"] = q.kmeans_iters;
  d["kmeans_seed"] = q.kmeans_seed, d["max_points"] = q.max_points, d["fallback"] = q.fallback, d["use_box"] = q.use_box;
  d["metric_euclidean"] = p.metric_euclidean, d["cycle_check"] = p.cycle_check, d["hard_negatives"] = p.hard_negatives;
  d["multimask_output"] = p.multimask_output, d["keep_largest_contour"] = p.keep_largest_contour;
  d["min_component_fraction"] = p.min_component_fraction, d["fill_holes"] = p.fill_holes;
  d["image_size"] = p.image_size, d["num_threads"] = p.num_threads, d["max_parallel_runs"] = p.max_parallel_runs;
  d["cuda_device"] = p.cuda_device;
  return d;
}

py::dict preset_params(const std::string& name) {
  refseg_params p;
  check(refseg_preset_params(name.c_str(), &p));
  return params_dict(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "refseg C API bindings: prompt engine, resampling, mask cleaning, presets (see refseg.pipeline.native)";
  m.attr("api_version") = refseg_api_version();
  py::class_<refseg_prompt_params>(m, "PromptParams", "refseg_prompt_params (refseg.h); starts as the sat preset's")
      .def(py::init([] { return refseg_default_prompt_params(); }))
      .def_readwrite("gbmseg_offimage_quirk", &refseg_prompt_params::gbmseg_offimage_quirk)
      .def_readwrite("radius_in_pixels", &refseg_prompt_params::radius_in_pixels)
      .def_readwrite("pos_radius", &refseg_prompt_params::pos_radius)
      .def_readwrite("neg_radius", &refseg_prompt_params::neg_radius)
      .def_readwrite("exclusion_radius", &refseg_prompt_params::exclusion_radius)
      .def_readwrite("hard_radius", &refseg_prompt_params::hard_radius)
      .def_readwrite("kmeans_k", &refseg_prompt_params::kmeans_k)
      .def_readwrite("kmeans_iters", &refseg_prompt_params::kmeans_iters)
      .def_readwrite("kmeans_seed", &refseg_prompt_params::kmeans_seed)
      .def_readwrite("max_points", &refseg_prompt_params::max_points)
      .def_readwrite("fallback", &refseg_prompt_params::fallback)
      .def_readwrite("use_box", &refseg_prompt_params::use_box);
  m.def("grid_labels", &grid_labels, "(K, S, S) uint8 masks -> (K, G, G) int8 labels (refseg_grid_labels)",
        py::arg("mask"), py::arg("rule"), py::arg("fraction"), py::arg("skip_last"), py::arg("patch_size"));
  m.def("match_nn", &match_nn, "nearest-neighbour match indices -> candidate masks (B, C, Nt) (refseg_match_candidates)",
        py::arg("fwd"), py::arg("far"), py::arg("fwd_val"), py::arg("bwd"), py::arg("labels"), py::arg("cosine"),
        py::arg("cycle_check"), py::arg("hard_negatives"), py::arg("fallback"), py::arg("offimage_quirk"));
  m.def("engineer_padded", &engineer_padded,
        "padded candidate sets -> (points, labels, num_points, boxes) (refseg_engineer_prompts per set)",
        py::arg("pos"), py::arg("pos_valid"), py::arg("neg"), py::arg("neg_valid"), py::arg("sizes"),
        py::arg("params"), py::arg("hard") = py::none(), py::arg("hard_valid") = py::none());
  m.def("resize_like_pil", &resize, "(H, W, C) uint8 -> (out_h, out_w, C) uint8, Pillow's resampling (refseg_resize)",
        py::arg("image"), py::arg("out_w"), py::arg("out_h"), py::arg("filter"));
  m.def("kmeans", &kmeans, "k-means of (n, d) float32 points -> (centres (k, d), labels (n,)) (refseg_kmeans)",
        py::arg("points"), py::arg("k"), py::arg("iters"), py::arg("seed"), py::arg("init"));
  m.def("clean_mask", &clean_mask, "(H, W) mask -> (H, W) bool, refseg.pipeline.postprocess.clean_mask (refseg_clean_mask)",
        py::arg("mask"), py::arg("keep_largest"), py::arg("min_component_fraction"), py::arg("fill_holes"));
  m.def("preset_params", &preset_params, "refseg_preset_params(name) as a dict of its fields", py::arg("name"));
  m.def("default_params", [] { return params_dict(refseg_default_params()); }, "refseg_default_params() as a dict");
}
