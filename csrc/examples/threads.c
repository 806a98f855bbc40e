/* refseg-threads: one model shared by several threads, one context each (C API example and test).
 *
 *   refseg-threads [-t THREADS] [-n TARGETS] [-w WARMUP] EXPORT_DIR [REF.ppm MASK.pgm TARGET.ppm ...]
 *
 * Loads EXPORT_DIR once, segments every target on one context (the sequential result), then starts THREADS
 * threads (default 4), each with its own context on the same model: each sets the reference, waits for the
 * others, and segments every target; its label maps must equal the sequential ones byte for byte. Prints the
 * seconds per image on one context and the images per second of all contexts together (segment calls only:
 * model loading and references excluded; WARMUP untimed calls on the first target come first, default 0).
 * Images are binary PPM (P6, RGB) / PGM (P5, mask: values = classes); without files, synthetic images are used
 * (a disc of class 1 on a textured background, targets with the disc moved): TARGETS of them (default 4).
 * Exit code 0 when everything ran and agreed, 1 otherwise, 2 for bad arguments.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "refseg.h"

typedef struct {
  int width, height, channels;
  uint8_t* pixels;
} image;

static refseg_image view(const image* im) {
  refseg_image v = {im->pixels, im->width, im->height, im->channels, (int64_t)im->width * im->channels};
  return v;
}

/* binary PPM (P6) or PGM (P5), maxval 255 */
static int read_pnm(const char* path, int channels, image* out) {
  FILE* f = fopen(path, "rb");
  char magic[3] = {0};
  int w, h, maxval;
  if (!f) {
    fprintf(stderr, "refseg-threads: %s: cannot open\n", path);
    return 0;
  }
  if (fscanf(f, "%2s %d %d %d", magic, &w, &h, &maxval) != 4 || strcmp(magic, channels == 3 ? "P6" : "P5") ||
      maxval != 255 || w <= 0 || h <= 0 || fgetc(f) == EOF) {
    fprintf(stderr, "refseg-threads: %s: not a binary %s with maxval 255\n", path, channels == 3 ? "PPM" : "PGM");
    fclose(f);
    return 0;
  }
  out->width = w, out->height = h, out->channels = channels;
  out->pixels = malloc((size_t)w * h * channels);
  const int ok = out->pixels && fread(out->pixels, 1, (size_t)w * h * channels, f) == (size_t)w * h * channels;
  fclose(f);
  if (!ok) fprintf(stderr, "refseg-threads: %s: truncated\n", path);
  return ok;
}

/* a disc of radius r at (cx, cy) on a background, both noisy (a fixed pseudo-random texture); mask: 1 inside */
static void synthetic(int w, int h, int cx, int cy, int r, image* rgb, image* mask) {
  uint32_t state = 12345u;
  rgb->width = mask->width = w, rgb->height = mask->height = h;
  rgb->channels = 3, mask->channels = 1;
  rgb->pixels = malloc((size_t)w * h * 3);
  mask->pixels = malloc((size_t)w * h);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      const int in = (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r;
      uint8_t* p = rgb->pixels + ((size_t)y * w + x) * 3;
      for (int c = 0; c < 3; ++c) {
        state = state * 1664525u + 1013904223u;
        const int noise = (int)(state >> 26);  /* 0..63 */
        p[c] = (uint8_t)((in ? 150 + 40 * (c == 0) : 40 + 30 * c) + noise);
      }
      mask->pixels[(size_t)y * w + x] = (uint8_t)in;
    }
}

typedef struct {
  refseg_model* model;
  const image *ref, *mask, *targets;
  int count;
  uint8_t** outputs;          /* this thread's label maps */
  pthread_barrier_t* barrier; /* all references set before any target (NULL: no wait) */
  int warmup;                 /* untimed segment calls on targets[0] first */
  double start, end;          /* of the segment calls */
  int ok;
} job;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* one context: the reference, then every target */
static void* run(void* arg) {
  job* j = arg;
  refseg_context* ctx = NULL;
  j->ok = 0;
  refseg_status s = refseg_context_create(j->model, &ctx);
  if (s == REFSEG_OK) {
    const refseg_image ri = view(j->ref), mi = view(j->mask);
    s = refseg_context_set_reference(ctx, &ri, &mi);
  }
  for (int w = 0; s == REFSEG_OK && w < j->warmup; ++w) {
    const refseg_image ti = view(&j->targets[0]);
    s = refseg_context_segment(ctx, &ti, j->outputs[0], ti.width);
  }
  if (j->barrier) pthread_barrier_wait(j->barrier); /* also on failure: the others must not wait forever */
  j->start = now();
  for (int i = 0; s == REFSEG_OK && i < j->count; ++i) {
    const refseg_image ti = view(&j->targets[i]);
    s = refseg_context_segment(ctx, &ti, j->outputs[i], ti.width);
  }
  j->end = now();
  if (s != REFSEG_OK)
    fprintf(stderr, "refseg-threads: %s: %s\n", refseg_status_string(s),
            ctx ? refseg_context_last_error(ctx) : refseg_last_error());
  j->ok = s == REFSEG_OK;
  refseg_context_free(ctx);
  return NULL;
}

static uint8_t** alloc_outputs(const image* targets, int count) {
  uint8_t** out = malloc(sizeof(uint8_t*) * count);
  for (int i = 0; i < count; ++i) out[i] = malloc((size_t)targets[i].width * targets[i].height);
  return out;
}

int main(int argc, char** argv) {
  int threads = 4, synthetic_count = 4, warmup = 0, arg = 1;
  for (; arg + 1 < argc && argv[arg][0] == '-'; arg += 2) {
    if (!strcmp(argv[arg], "-t")) threads = atoi(argv[arg + 1]);
    else if (!strcmp(argv[arg], "-n")) synthetic_count = atoi(argv[arg + 1]);
    else if (!strcmp(argv[arg], "-w")) warmup = atoi(argv[arg + 1]);
    else break;
  }
  if (arg >= argc || threads < 1 || threads > 64 || synthetic_count < 1 || warmup < 0 ||
      (argc - arg != 1 && argc - arg < 4)) {
    fprintf(stderr, "usage: %s [-t THREADS] [-n TARGETS] [-w WARMUP] EXPORT_DIR [REF.ppm MASK.pgm TARGET.ppm ...]\n",
            argv[0]);
    return 2;
  }
  image ref, mask, *targets;
  int count;
  if (argc - arg == 1) {
    count = synthetic_count;
    targets = calloc((size_t)count, sizeof(image));
    synthetic(160, 128, 70, 60, 30, &ref, &mask);
    for (int i = 0; i < count; ++i) {
      image unused;
      synthetic(150 + 10 * i, 120, 50 + 12 * i, 55 + 4 * i, 26, &targets[i], &unused);
      free(unused.pixels);
    }
  } else {
    count = argc - arg - 3;
    targets = calloc((size_t)count, sizeof(image));
    if (!read_pnm(argv[arg + 1], 3, &ref) || !read_pnm(argv[arg + 2], 1, &mask)) return 2;
    for (int i = 0; i < count; ++i)
      if (!read_pnm(argv[arg + 3 + i], 3, &targets[i])) return 2;
  }

  refseg_params params = refseg_default_params(); /* the "sat" preset */
  params.max_parallel_runs = threads;             /* every thread's model stages may run at once */
  refseg_model* model = NULL;
  if (refseg_model_load(argv[arg], &params, &model) != REFSEG_OK) {
    fprintf(stderr, "refseg-threads: %s\n", refseg_last_error());
    return 1;
  }

  /* the sequential result: one context, every target */
  job single = {model, &ref, &mask, targets, count, alloc_outputs(targets, count), NULL, warmup, 0, 0, 0};
  run(&single);
  const double t_single = single.end - single.start;
  int failures = !single.ok;

  /* THREADS contexts on the same model, at the same time */
  pthread_t* tid = malloc(sizeof(pthread_t) * threads);
  job* jobs = malloc(sizeof(job) * threads);
  pthread_barrier_t barrier;
  pthread_barrier_init(&barrier, NULL, (unsigned)threads);
  for (int t = 0; t < threads; ++t) {
    jobs[t] = single;
    jobs[t].barrier = &barrier;
    jobs[t].outputs = alloc_outputs(targets, count);
    if (pthread_create(&tid[t], NULL, run, &jobs[t])) {
      fprintf(stderr, "refseg-threads: cannot start thread %d\n", t);
      return 1;
    }
  }
  for (int t = 0; t < threads; ++t) pthread_join(tid[t], NULL);
  pthread_barrier_destroy(&barrier);
  double first = jobs[0].start, last = jobs[0].end;
  for (int t = 1; t < threads; ++t) {
    first = jobs[t].start < first ? jobs[t].start : first;
    last = jobs[t].end > last ? jobs[t].end : last;
  }
  const double t_threads = last - first;
  int differ = 0, foreground = 0;
  for (int t = 0; t < threads; ++t) {
    failures += !jobs[t].ok;
    for (int i = 0; jobs[t].ok && single.ok && i < count; ++i)
      differ += memcmp(jobs[t].outputs[i], single.outputs[i], (size_t)targets[i].width * targets[i].height) != 0;
  }
  for (int i = 0; single.ok && i < count; ++i)
    for (int k = 0; k < targets[i].width * targets[i].height; ++k) foreground += single.outputs[i][k] != 0;
  printf("one context: %d image(s) in %.3f s, %.4f s per image, %.3f images/s\n", count, t_single,
         t_single / count, count / t_single);
  printf("%d contexts on one model: %d image(s) in %.3f s, %.3f images/s\n", threads, threads * count, t_threads,
         threads * count / t_threads);
  printf("foreground pixels (one context): %d; label maps differing from the one-context run: %d of %d\n",
         foreground, differ, threads * count);
  if (!foreground) fprintf(stderr, "refseg-threads: every label map is empty: the comparison would prove nothing\n");
  refseg_model_free(model);
  for (int t = 0; t <= threads; ++t) {
    uint8_t** outputs = t < threads ? jobs[t].outputs : single.outputs;
    for (int i = 0; i < count; ++i) free(outputs[i]);
    free(outputs);
  }
  for (int i = 0; i < count; ++i) free(targets[i].pixels);
  free(targets), free(ref.pixels), free(mask.pixels), free(jobs), free(tid);
  return failures || differ || !foreground ? 1 : 0;
}
