/* refseg.h — C API of the refseg C++ core (shared library `refseg`).
 *
 * Shape follows llama.cpp's llama.h: opaque handles, a model loaded once and shared read-only by any number of
 * per-thread contexts, a params struct with a defaults function, progress and log callbacks with user data,
 * status codes plus a last-error string, one visibility macro.
 *
 *   refseg_params params = refseg_default_params();           // the "sat" preset
 *   refseg_model* model;   refseg_model_load("export/", &params, &model);
 *   refseg_context* ctx;   refseg_context_create(model, &ctx);  // one per thread
 *   refseg_context_set_reference(ctx, &ref_image, &ref_mask);   // again for n-shot
 *   refseg_context_segment(ctx, &target, labels, width);        // class values, 0 = background
 *   refseg_context_free(ctx);  refseg_model_free(model);
 *
 * Conventions
 *   - Images are caller-owned, row-major, 8 bits per channel: `data` points at the top-left pixel, `stride` is
 *     the distance in BYTES between the starts of two rows (>= width * channels), int64 everywhere.
 *     RGB images have channels = 3 (or 4: RGBA, alpha ignored; 1: grey); masks and outputs have channels = 1.
 *   - Points are (x, y) pixels of the target image: x = column, y = row, origin top-left.
 *   - Every function returning refseg_status reports failure with a code and a message (refseg_last_error(),
 *     refseg_context_last_error()) naming the argument or file and the problem. Outputs are left untouched on
 *     failure.
 *
 * Threads and lifetimes
 *   - A refseg_model is read-only once loaded: any number of contexts, in any threads, may use it at the same
 *     time. It must outlive its contexts (free the contexts first). Model stages of different contexts run in
 *     parallel up to params.max_parallel_runs; beyond that a call waits for a free runner.
 *   - A refseg_context belongs to one thread at a time: calls on ONE context must not overlap (different
 *     contexts may run concurrently). It holds its references, its scratch memory and, with TensorRT engines,
 *     its CUDA stream, execution contexts and device / pinned buffers.
 *   - The prompt-engine functions (refseg_grid_labels, refseg_engineer_prompts, ...) are reentrant.
 *   - Images and masks are read during the call only; refseg keeps no pointer to caller memory. Returned
 *     strings are owned by the library: refseg_status_string's are static; refseg_last_error()'s stays valid
 *     until the next failing call in the same thread, refseg_context_last_error()'s until the next failing
 *     call on that context or its release; refseg_model_backend()'s while the model lives.
 *   - Callback user data is never dereferenced by refseg and must stay valid while the callback is set. The
 *     progress callback runs in the thread that called into the context; the log callback in whichever thread
 *     logs, one line at a time (refseg_log_set).
 *   - The models use LibTorch's intra-op thread pool (params.num_threads; the pool is process-wide).
 */
#ifndef REFSEG_H
#define REFSEG_H

#include <stddef.h>
#include <stdint.h>

#ifdef REFSEG_SHARED
#  if defined(_WIN32) && !defined(__MINGW32__)
#    ifdef REFSEG_BUILD
#      define REFSEG_API __declspec(dllexport)
#    else
#      define REFSEG_API __declspec(dllimport)
#    endif
#  else
#    define REFSEG_API __attribute__((visibility("default")))
#  endif
#else
#  define REFSEG_API
#endif

/* Bumped on every incompatible change of this header (structs, signatures, semantics).
 * 2: model / context split (refseg_engine_* removed), class label maps, n-shot, batches, log callback,
 *    refseg_last_error(void), new params fields, prompt-engine entry points of refseg._C.
 * 3: refseg_prompt_params.patch_size (the matching encoder's patch side: 14 DINOv2, 16 DINOv3; exports record
 *    it in their manifest). */
#define REFSEG_API_VERSION 3

#ifdef __cplusplus
extern "C" {
#endif

typedef enum refseg_status {
  REFSEG_OK = 0,
  REFSEG_ERR_INVALID_ARGUMENT = 1, /* null pointer, zero / mismatched size, bad parameter value */
  REFSEG_ERR_BUFFER_TOO_SMALL = 2, /* an output capacity is smaller than the result */
  REFSEG_ERR_INTERNAL = 3,         /* unexpected failure (out of memory, a model run failing, ...) */
  REFSEG_ERR_ARTIFACT = 4,         /* artifact folder missing, corrupt, or not matching the params */
  REFSEG_ERR_STATE = 5,            /* call out of order: segmenting before any reference was set */
  REFSEG_ERR_CANCELLED = 6,        /* the progress callback returned 0 */
  REFSEG_ERR_UNSUPPORTED = 7       /* this build lacks the runtime the artifact needs (LibTorch, TensorRT) */
} refseg_status;

/* REFSEG_API_VERSION of the library actually loaded (compare with the macro at build time). */
REFSEG_API int refseg_api_version(void);
/* Static English name of a status code ("REFSEG_OK", ...). */
REFSEG_API const char* refseg_status_string(refseg_status status);
/* Message of the calling thread's last failing call ("" when none failed). */
REFSEG_API const char* refseg_last_error(void);

/* ---------------------------------------------------------------- logging */
typedef enum refseg_log_level {
  REFSEG_LOG_DEBUG = 0,
  REFSEG_LOG_INFO = 1,
  REFSEG_LOG_WARN = 2,
  REFSEG_LOG_ERROR = 3
} refseg_log_level;

/* `message` is one line without a newline, valid during the call only. */
typedef void (*refseg_log_callback)(refseg_log_level level, const char* message, void* user_data);

/* Process-wide log sink (model loading, backend choice, warnings). NULL restores the default: WARN and ERROR
 * lines to stderr. Lines from several threads are delivered one at a time (under a lock: the callback may call
 * refseg functions, but must not wait for another thread that logs); once refseg_log_set returns, no thread is
 * inside the previous callback any more. */
REFSEG_API void refseg_log_set(refseg_log_callback callback, void* user_data);

/* ---------------------------------------------------------------- parameters */
typedef struct refseg_point {
  double x, y; /* pixels of the target image */
} refseg_point;

typedef enum refseg_grid_rule {
  REFSEG_GRID_ALL = 0,      /* FG when all patch_size x patch_size pixels are FG, BG when none is, else ignored */
  REFSEG_GRID_ANY = 1,      /* FG when any pixel is FG, else BG */
  REFSEG_GRID_FRACTION = 2  /* FG / BG when its share is >= grid_fraction, else ignored */
} refseg_grid_rule;

/* Knobs of the prompt engine; field meanings as in refseg's SegmenterConfig of the same names. */
typedef struct refseg_prompt_params {
  int32_t patch_size;        /* the matching encoder's patch side in pixels (14 DINOv2, 16 DINOv3): grid cells are
                                patch_size x patch_size pixels of the S x S mask. refseg_model_load: the export's
                                (manifest "patch_size", 14 for older exports) when 0, else it must equal it */
  int32_t grid_rule;         /* a refseg_grid_rule (an int so any value can be checked safely) */
  double grid_fraction;
  int gbmseg_skip_last;      /* bool: ignore the last grid row and column */
  int gbmseg_offimage_quirk; /* bool: keep off-image points */
  int radius_in_pixels;      /* bool: radii are pixels; 0 = fractions of max(H, W) */
  double pos_radius, neg_radius, exclusion_radius, hard_radius;
  int kmeans_k;              /* 0 = no thinning */
  int kmeans_iters;
  int64_t kmeans_seed;
  int max_points;            /* 0 = no cap; else >= 2 */
  int fallback;              /* bool */
  int use_box;               /* bool */
} refseg_prompt_params;

/* The "sat" preset's prompt fields (refseg_default_params().prompts). */
REFSEG_API refseg_prompt_params refseg_default_prompt_params(void);

/* Progress: called between stages with the stage name ("reference", "dinov2", "sam_encoder", "matching",
 * "decoder", "done", ...) and the fraction done in [0, 1]. Return non-zero to continue, 0 to cancel (the call
 * then returns REFSEG_ERR_CANCELLED). */
typedef int (*refseg_progress_callback)(const char* stage, float fraction, void* user_data);

typedef struct refseg_params {
  /* -- the method: the fields of refseg's SegmenterConfig of the same names (see refseg_preset_params) */
  refseg_prompt_params prompts;   /* grid, radii, k-means, ... */
  int metric_euclidean;           /* bool: 0 = cosine matching */
  int cycle_check;                /* bool */
  int hard_negatives;             /* bool */
  int multimask_output;           /* bool: SAM's 3 masks, keep the best predicted IoU */
  int keep_largest_contour;       /* bool: keep only the largest component, holes filled */
  double min_component_fraction;  /* drop components smaller than this share of the largest; 0 = off */
  int fill_holes;                 /* bool */
  /* -- the runtime */
  int image_size;                 /* encoder input side S the export must have; 0 = take the export's */
  int num_threads;                /* LibTorch intra-op threads (process-wide); 0 = LibTorch's default */
  int max_parallel_runs;          /* contexts whose model stages may run at the same moment (AOTInductor
                                     runners sharing the weights); 0 = 4 */
  int cuda_device;                /* TensorRT engines: CUDA device; -1 = $REFSEG_CUDA_DEVICE or 0 */
  refseg_progress_callback progress_callback; /* default of every context (refseg_context_set_progress) */
  void* progress_user_data;       /* passed to progress_callback unchanged */
} refseg_params;

/* The "sat" preset of refseg's SegmenterConfig, runtime fields at their defaults (0, 0, 0, -1, NULL, NULL). */
REFSEG_API refseg_params refseg_default_params(void);
/* The named preset's method fields over the defaults' runtime fields: "sat" or "gbmseg" (the presets the C++
 * pipeline runs). REFSEG_ERR_INVALID_ARGUMENT for other names; *out is untouched then. */
REFSEG_API refseg_status refseg_preset_params(const char* name, refseg_params* out);

/* ---------------------------------------------------------------- images */
/* Caller-owned interleaved 8-bit image: channels 1 (grey), 3 (RGB) or 4 (RGBA, alpha ignored). */
typedef struct refseg_image {
  const uint8_t* data;
  int32_t width, height, channels;
  int64_t stride; /* bytes per row, >= width * channels */
} refseg_image;

/* ---------------------------------------------------------------- model and contexts
 * An artifact folder is written by `refseg export --format aoti` (manifest.json + dinov2.pt2, sam_encoder.pt2,
 * sam_decoder.pt2; CPU packages) or `refseg export --format onnx,tensorrt` (TensorRT engines; builds with
 * -DREFSEG_WITH_TENSORRT=ON). */
typedef struct refseg_model refseg_model;     /* opaque, shared read-only */
typedef struct refseg_context refseg_context; /* opaque, one per thread */

/* Load the artifact folder with `params` (NULL: refseg_default_params()); *out_model receives the model (NULL
 * on failure). Errors: REFSEG_ERR_ARTIFACT (missing / corrupt / mismatched folder), REFSEG_ERR_UNSUPPORTED,
 * REFSEG_ERR_INVALID_ARGUMENT (a bad params field); the message in refseg_last_error(). */
REFSEG_API refseg_status refseg_model_load(const char* artifact_dir, const refseg_params* params,
                                           refseg_model** out_model);
/* Release the model (NULL is a no-op). Every context of it must have been freed. */
REFSEG_API void refseg_model_free(refseg_model* model);
/* The params the model was loaded with (image_size: the export's S; prompts.patch_size: its encoder's patch). */
REFSEG_API refseg_status refseg_model_params(const refseg_model* model, refseg_params* out);
/* Matching-encoder input side S of the export (0 for NULL). */
REFSEG_API int32_t refseg_model_image_size(const refseg_model* model);
/* "aoti-cpu" or "tensorrt" ("" for NULL). */
REFSEG_API const char* refseg_model_backend(const refseg_model* model);

/* A context on `model` (its params, progress callback included); *out_context is NULL on failure. */
REFSEG_API refseg_status refseg_context_create(refseg_model* model, refseg_context** out_context);
/* Release the context (NULL is a no-op). */
REFSEG_API void refseg_context_free(refseg_context* context);
/* Message of the last failing call on `context` ("" when none failed or context is NULL). */
REFSEG_API const char* refseg_context_last_error(const refseg_context* context);
/* Replace this context's progress callback (NULL: none). */
REFSEG_API void refseg_context_set_progress(refseg_context* context, refseg_progress_callback callback,
                                            void* user_data);

/* Add one reference shot: `image` and its `mask` (same size; mask channels = 1). Mask values are classes:
 * 0 = background, every other value v = class v (a 0/255 mask is one class, 255). Every class of the mask must
 * cover at least one whole patch (patch_size x patch_size pixels) at the model's S (grid rule), or the call fails. Repeated calls add
 * shots (n-shot: reference patches are pooled; a class absent from a shot is background there);
 * refseg_context_clear_references forgets them. */
REFSEG_API refseg_status refseg_context_set_reference(refseg_context* context, const refseg_image* image,
                                                      const refseg_image* mask);
REFSEG_API void refseg_context_clear_references(refseg_context* context);
/* Reference shots held (0 for NULL). */
REFSEG_API int32_t refseg_context_num_references(const refseg_context* context);
/* Classes of the references, ascending, into out[capacity]; returns their number (which may exceed capacity:
 * only the first `capacity` are written; out may be NULL with capacity 0). */
REFSEG_API int32_t refseg_context_classes(const refseg_context* context, uint8_t* out, int32_t capacity);

/* Segment one target: out_labels receives target->height rows of target->width bytes, out_stride bytes apart
 * (>= width): the class value of each pixel, 0 = background. */
REFSEG_API refseg_status refseg_context_segment(refseg_context* context, const refseg_image* target,
                                                uint8_t* out_labels, int64_t out_stride);
/* Segment `count` targets (sizes may differ), outputs as refseg_context_segment's: out_labels[i] with
 * out_strides[i]. Encoders run on batches where the export allows it. Every target is checked before any
 * work; on failure no output is written. */
REFSEG_API refseg_status refseg_context_segment_batch(refseg_context* context, const refseg_image* targets,
                                                      int32_t count, uint8_t* const* out_labels,
                                                      const int64_t* out_strides);

/* ---------------------------------------------------------------- prompt engine and post-processing
 * The stages of refseg's Python pipeline that run in C++ (also behind refseg._C). Reentrant. */

/* Reference mask already resized to side x side (non-zero = FG, `stride` bytes per row) -> grid
 * labels out_labels[G^2] (1 FG, 0 BG, -1 ignored), G = side / params->patch_size, cell i = row * G + col.
 * params->patch_size must be positive and divide side. */
REFSEG_API refseg_status refseg_grid_labels(const uint8_t* mask, int32_t side, int64_t stride,
                                            const refseg_prompt_params* params, int8_t* out_labels);

/* Matching post-processing of one target (refseg.pipeline.matching.match_candidates, matcher "nn"):
 *   fwd[nr], far[nr], fwd_val[nr]: each reference patch's best / worst target patch and its best score;
 *   bwd[nt]: each target patch's best reference patch; labels[classes * nr]: grids (1 / 0 / -1) per class.
 *   Uses params->metric_euclidean, cycle_check, hard_negatives, prompts.fallback, prompts.gbmseg_offimage_quirk.
 * Outputs (0/1 bytes): out_pos, out_neg, out_hard [classes * nt]; out_offimage_pos, out_offimage_neg [classes]. */
REFSEG_API refseg_status refseg_match_candidates(const int64_t* fwd, const int64_t* far, const double* fwd_val,
                                                 const int64_t* bwd, int32_t nr, int32_t nt, const int8_t* labels,
                                                 int32_t classes, const refseg_params* params, uint8_t* out_pos,
                                                 uint8_t* out_neg, uint8_t* out_hard, uint8_t* out_offimage_pos,
                                                 uint8_t* out_offimage_neg);

/* Physical-space prompt stage for one prompt set of a (height x width) target.
 *   pos[n_pos], neg[n_neg]: candidate points in walk order; hard[n_hard] hard negatives (hard may
 *   be NULL only with n_hard = 0, meaning "no hard-negative list").
 *   out_points[capacity], out_labels[capacity] (1 positive, 0 negative) receive positives first,
 *   then negatives, then hard negatives; *out_count their number. out_box (may be NULL) receives
 *   the positives' extent (x0, y0, x1, y1) when params->use_box, NaN when there is no positive.
 * capacity >= n_pos + n_neg + n_hard always suffices. */
REFSEG_API refseg_status refseg_engineer_prompts(const refseg_point* pos, int32_t n_pos,
                                                 const refseg_point* neg, int32_t n_neg,
                                                 const refseg_point* hard, int32_t n_hard,
                                                 int32_t height, int32_t width,
                                                 const refseg_prompt_params* params,
                                                 refseg_point* out_points, int32_t* out_labels,
                                                 int32_t capacity, int32_t* out_count,
                                                 double out_box[4]);

/* k-means of n points of dimension d (float32, row-major) into k <= n centres, refseg.kernels.kmeans_reference's
 * conventions (deterministic draws from seed; plus_plus: k-means++ seeding, else the first k points).
 * out_centres[k * d], out_labels[n]. */
REFSEG_API refseg_status refseg_kmeans(const float* points, int32_t n, int32_t d, int32_t k, int32_t iters,
                                       int64_t seed, int plus_plus, float* out_centres, int64_t* out_labels);

typedef enum refseg_filter { REFSEG_FILTER_BILINEAR = 0, REFSEG_FILTER_BICUBIC = 1 } refseg_filter;

/* Resize an 8-bit image as Pillow's Image.resize does ("L" / "RGB" images): out receives out_height rows of
 * out_width * src->channels bytes, out_stride bytes apart. */
REFSEG_API refseg_status refseg_resize(const refseg_image* src, int32_t out_width, int32_t out_height,
                                       int32_t filter, uint8_t* out, int64_t out_stride);

/* refseg.pipeline.postprocess.clean_mask in place on a (height x width) mask (non-zero = FG, stride bytes per
 * row): keep_largest (largest 8-connected component, holes filled), else min_component_fraction (drop smaller
 * components; 0 = off), then fill_holes. The mask becomes 1 = FG, 0 = BG. */
REFSEG_API refseg_status refseg_clean_mask(uint8_t* mask, int32_t width, int32_t height, int64_t stride,
                                           int keep_largest, double min_component_fraction, int fill_holes);

#ifdef __cplusplus
}
#endif

#endif /* REFSEG_H */
