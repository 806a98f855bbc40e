/* refseg.h — C API of the refseg C++ core (shared library `refseg`).
 *
 * Shape follows llama.cpp's llama.h: opaque handles, a params struct with a defaults function, a
 * progress callback with user data, status codes plus a last-error string, one visibility macro.
 *
 * Conventions
 *   - Images are caller-owned, row-major, 8 bits per channel: `data` points at the top-left pixel,
 *     `stride` is the distance in BYTES between the starts of two rows (>= width * channels).
 *     RGB images have channels = 3 (or 4: RGBA, alpha ignored); masks and outputs have channels = 1.
 *   - Points are (x, y) pixels of the target image: x = column, y = row, origin top-left.
 *   - Every function returns a refseg_status; on failure refseg_last_error() gives a message naming
 *     the argument or file and the problem. Outputs are left untouched on failure.
 *
 * Thread safety
 *   - The prompt-engine functions (refseg_grid_labels, refseg_engineer_prompts) are reentrant.
 *   - A refseg_engine is not: calls on ONE engine must not overlap (serialise them, or create one
 *     engine per thread; engines share nothing). Different engines may run concurrently. The models
 *     use LibTorch's intra-op thread pool (params.num_threads; the pool is process-wide).
 *   - refseg_last_error(NULL) is per thread: the last failing call of the calling thread.
 *     refseg_last_error(engine) is the last failing call on that engine. Both strings stay valid
 *     until the next failing call of that thread / on that engine.
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

/* Bumped on every incompatible change of this header (structs, signatures, semantics). */
#define REFSEG_API_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

typedef enum refseg_status {
  REFSEG_OK = 0,
  REFSEG_ERR_INVALID_ARGUMENT = 1, /* null pointer, zero / mismatched size, bad parameter value */
  REFSEG_ERR_BUFFER_TOO_SMALL = 2, /* an output capacity is smaller than the result */
  REFSEG_ERR_INTERNAL = 3,         /* unexpected failure (out of memory, a model run failing, ...) */
  REFSEG_ERR_ARTIFACT = 4,         /* artifact folder missing, corrupt, or not matching the params */
  REFSEG_ERR_STATE = 5,            /* call out of order: refseg_segment before refseg_set_reference */
  REFSEG_ERR_CANCELLED = 6,        /* the progress callback returned 0 */
  REFSEG_ERR_UNSUPPORTED = 7       /* this build lacks the model runtime (built without LibTorch) */
} refseg_status;

/* REFSEG_API_VERSION of the library actually loaded (compare with the macro at build time). */
REFSEG_API int refseg_api_version(void);
/* Static English name of a status code ("REFSEG_OK", ...). */
REFSEG_API const char* refseg_status_string(refseg_status status);
typedef struct refseg_engine refseg_engine; /* opaque */

/* Message of the last failing call on `engine`, or of the calling thread when engine is NULL
 * ("" when none failed). */
REFSEG_API const char* refseg_last_error(const refseg_engine* engine);

typedef struct refseg_point {
  double x, y; /* pixels of the target image */
} refseg_point;

typedef enum refseg_grid_rule {
  REFSEG_GRID_ALL = 0,      /* FG when all 14x14 pixels are FG, BG when none is, else ignored */
  REFSEG_GRID_ANY = 1,      /* FG when any pixel is FG, else BG */
  REFSEG_GRID_FRACTION = 2  /* FG / BG when its share is >= grid_fraction, else ignored */
} refseg_grid_rule;

/* Knobs of the prompt engine; field meanings as in refseg's SegmenterConfig of the same names. */
typedef struct refseg_prompt_params {
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

/* The "sat" preset's values (radii 0.125 of the side, k-means 16, fall-back on, no box). */
REFSEG_API refseg_prompt_params refseg_default_prompt_params(void);

/* Reference mask already resized to side x side (non-zero = FG, `stride` bytes per row) -> grid
 * labels out_labels[(side/14)^2] (1 FG, 0 BG, -1 ignored), cell i = row * (side/14) + col.
 * side must be a positive multiple of 14. */
REFSEG_API refseg_status refseg_grid_labels(const uint8_t* mask, int32_t side, int64_t stride,
                                            const refseg_prompt_params* params, int8_t* out_labels);

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

/* ---------------------------------------------------------------- the segmentation engine
 * Runs the models from an artifact folder written by `refseg export --format aoti` (manifest.json,
 * dinov2.pt2, sam_encoder.pt2, sam_decoder.pt2; CPU packages in this build). One binary reference
 * (mask non-zero = foreground); each target gives a binary mask of the target's size. */

/* Progress: called between stages with the stage name ("dinov2", "matching", "prompts",
 * "sam_encoder", "decoder", "postprocess", "done", ...) and the fraction done in [0, 1].
 * Return non-zero to continue, 0 to cancel (the call then returns REFSEG_ERR_CANCELLED). */
typedef int (*refseg_progress_callback)(const char* stage, float fraction, void* user_data);

typedef struct refseg_params {
  refseg_prompt_params prompts;  /* grid, radii, k-means, ... (refseg_default_prompt_params) */
  int metric_euclidean;          /* bool: 0 = cosine matching (default) */
  int cycle_check;               /* bool */
  int hard_negatives;            /* bool */
  int multimask_output;          /* bool: SAM's 3 masks, keep the best predicted IoU (default 1) */
  double min_component_fraction; /* drop components smaller than this share of the largest; 0 = off */
  int image_size;                /* DINOv2 side S the export must have; 0 = take the export's */
  int num_threads;               /* LibTorch intra-op threads; 0 = LibTorch's default */
  refseg_progress_callback progress_callback; /* may be NULL */
  void* progress_user_data;      /* passed to progress_callback unchanged */
} refseg_params;

/* The "sat" preset of refseg's SegmenterConfig. */
REFSEG_API refseg_params refseg_default_params(void);

/* Caller-owned interleaved 8-bit image: channels 1 (grey), 3 (RGB) or 4 (RGBA, alpha ignored). */
typedef struct refseg_image {
  const uint8_t* data;
  int32_t width, height, channels;
  int64_t stride; /* bytes per row, >= width * channels */
} refseg_image;

/* Load the artifact folder; *out_engine receives the engine (NULL on failure). params may be NULL
 * (defaults). Errors: REFSEG_ERR_ARTIFACT (missing / corrupt / mismatched folder), ...; the message
 * is in refseg_last_error(NULL). */
REFSEG_API refseg_status refseg_engine_create(const char* artifact_dir, const refseg_params* params,
                                              refseg_engine** out_engine);

/* Encode the reference (image and mask of the same size; mask channels = 1, non-zero = FG). */
REFSEG_API refseg_status refseg_set_reference(refseg_engine* engine, const refseg_image* image,
                                              const refseg_image* mask);

/* Segment a target: out_mask receives image->height rows of image->width bytes, 255 = FG, 0 = BG,
 * out_stride bytes apart (>= width). */
REFSEG_API refseg_status refseg_segment(refseg_engine* engine, const refseg_image* image,
                                        uint8_t* out_mask, int64_t out_stride);

/* Release the engine (NULL is a no-op). */
REFSEG_API void refseg_engine_free(refseg_engine* engine);

#ifdef __cplusplus
}
#endif

#endif /* REFSEG_H */
