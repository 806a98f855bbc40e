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
 *   - The last-error string is per thread: it describes the last failing call of the calling thread
 *     and stays valid until that thread's next failing call.
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
  REFSEG_ERR_INTERNAL = 3          /* unexpected failure (out of memory, ...) */
} refseg_status;

/* REFSEG_API_VERSION of the library actually loaded (compare with the macro at build time). */
REFSEG_API int refseg_api_version(void);
/* Static English name of a status code ("REFSEG_OK", ...). */
REFSEG_API const char* refseg_status_string(refseg_status status);
/* Message of the calling thread's last failing call ("" when none failed). */
REFSEG_API const char* refseg_last_error(void);

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
  refseg_grid_rule grid_rule;
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

#ifdef __cplusplus
}
#endif

#endif /* REFSEG_H */
