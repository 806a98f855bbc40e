// PNG / JPEG reading and PNG writing for refseg-cli (see image_files.h).
#include "image_files.h"

#include <png.h>
// jpeglib.h needs FILE and size_t declared first
#include <cstdio>
#include <jpeglib.h>

#include <algorithm>
#include <cctype>
#include <csetjmp>
#include <cstring>

namespace refseg_cli {

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

enum class Kind { Png, Jpeg, Other };

Kind sniff(const std::string& path) {
  unsigned char magic[8] = {0};
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return Kind::Other;
  const size_t n = std::fread(magic, 1, sizeof magic, f);
  std::fclose(f);
  if (n >= 8 && std::memcmp(magic, "\x89PNG\r\n\x1a\n", 8) == 0) return Kind::Png;
  if (n >= 3 && magic[0] == 0xff && magic[1] == 0xd8 && magic[2] == 0xff) return Kind::Jpeg;
  return Kind::Other;
}

bool read_png(const std::string& path, bool as_labels, Raster& out, std::string& error) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str())) {
    error = path + ": " + image.message;
    return false;
  }
  const bool palette = image.format & PNG_FORMAT_FLAG_COLORMAP;
  const bool colour = image.format & PNG_FORMAT_FLAG_COLOR;
  const bool alpha = image.format & PNG_FORMAT_FLAG_ALPHA;
  std::vector<png_color> colormap;
  if (as_labels && palette) {
    image.format = PNG_FORMAT_RGB_COLORMAP;  // palette indices, as refseg.read_mask reads palette PNGs
    colormap.resize(PNG_IMAGE_MAXIMUM_COLORMAP_COMPONENTS(image.format));
    out.channels = 1;
  } else {
    image.format = colour ? (alpha ? PNG_FORMAT_RGBA : PNG_FORMAT_RGB) : PNG_FORMAT_GRAY;  // alpha kept, not composed
    out.channels = colour ? (alpha ? 4 : 3) : 1;
  }
  out.width = static_cast<int>(image.width);
  out.height = static_cast<int>(image.height);
  out.pixels.resize(PNG_IMAGE_SIZE(image));
  if (!png_image_finish_read(&image, nullptr, out.pixels.data(), 0, colormap.empty() ? nullptr : colormap.data())) {
    error = path + ": " + image.message;
    png_image_free(&image);
    return false;
  }
  return true;
}

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_jpeg_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

bool read_jpeg(const std::string& path, Raster& out, std::string& error) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    error = path + ": cannot open";
    return false;
  }
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = on_jpeg_error;
  std::vector<uint8_t>& pixels = out.pixels;  // no object with a destructor is created after setjmp
  if (setjmp(err.jump)) {
    error = path + ": " + err.message;
    jpeg_destroy_decompress(&cinfo);
    std::fclose(f);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_stdio_src(&cinfo, f);
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    std::fclose(f);
    error = path + ": CMYK JPEG is not supported (convert it to RGB)";
    return false;
  }
  cinfo.out_color_space = cinfo.num_components == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  out.width = static_cast<int>(cinfo.output_width);
  out.height = static_cast<int>(cinfo.output_height);
  out.channels = cinfo.output_components;
  pixels.resize(static_cast<size_t>(out.width) * out.height * out.channels);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = pixels.data() + static_cast<size_t>(cinfo.output_scanline) * out.width * out.channels;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  std::fclose(f);
  return true;
}

}  // namespace

bool is_image_name(const std::string& path) {
  const std::string p = lower(path);
  for (const char* ext : {".png", ".jpg", ".jpeg"})
    if (p.size() > std::strlen(ext) && p.compare(p.size() - std::strlen(ext), std::string::npos, ext) == 0) return true;
  return false;
}

bool read_image(const std::string& path, Raster& out, std::string& error) {
  switch (sniff(path)) {
    case Kind::Png: return read_png(path, false, out, error);
    case Kind::Jpeg: return read_jpeg(path, out, error);
    default: error = path + ": not a PNG or JPEG file (or unreadable)"; return false;
  }
}

bool read_mask(const std::string& path, Raster& out, std::string& error) {
  const Kind kind = sniff(path);
  if (kind == Kind::Other) {
    error = path + ": not a PNG or JPEG file (or unreadable)";
    return false;
  }
  if (!(kind == Kind::Png ? read_png(path, true, out, error) : read_jpeg(path, out, error))) return false;
  const size_t n = static_cast<size_t>(out.width) * out.height;
  std::vector<uint8_t> labels(n);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = out.pixels.data() + i * out.channels;
    if (out.channels >= 3 && kind == Kind::Png && (p[0] != p[1] || p[1] != p[2])) {
      error = path + ": colour mask with differing R, G, B channels; masks must be grey or integer label images";
      return false;
    }
    // JPEG: the mean of R, G, B (refseg's reader averages a grey JPEG's channels), binarised at >= 128
    labels[i] = kind == Kind::Jpeg ? ((out.channels >= 3 ? (p[0] + p[1] + p[2] + 1) / 3 : p[0]) >= 128 ? 255 : 0) : p[0];
  }
  out.pixels.swap(labels);
  out.channels = 1;
  return true;
}

bool write_png(const std::string& path, const uint8_t* grey, int width, int height, std::string& error) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(width);
  image.height = static_cast<png_uint_32>(height);
  image.format = PNG_FORMAT_GRAY;
  const std::string tmp = path + ".part";
  if (!png_image_write_to_file(&image, tmp.c_str(), 0, grey, 0, nullptr)) {
    error = path + ": cannot write (" + image.message + ")";
    std::remove(tmp.c_str());
    return false;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    error = path + ": cannot rename " + tmp + " over it";
    std::remove(tmp.c_str());
    return false;
  }
  return true;
}

}  // namespace refseg_cli
