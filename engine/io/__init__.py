"""Input and output of 2-D rasters: image / mask readers (``raster``), mask rules (``masks``) and atomic output
writers (``writers``); volumes, DICOM and slides in their own modules."""
from refseg.io.masks import mask_from_array
from refseg.io.raster import (IMAGE_SUFFIXES, ImageReadError, is_image_file, list_images, read_image,
                              read_label_map, read_mask, to_rgb_uint8)
from refseg.io.writers import (OutputPaths, atomic_write_bytes, atomic_writer, is_done,
                               mask_to_png_array, output_paths, overlay, prepare_output_folder, remove_temporaries, unique_stems,
                               write_json, write_png)

__all__ = [
    "IMAGE_SUFFIXES", "ImageReadError", "is_image_file", "list_images", "mask_from_array", "read_image",
    "read_label_map", "read_mask", "to_rgb_uint8",
    "OutputPaths", "atomic_write_bytes", "atomic_writer", "is_done", "mask_to_png_array",
    "output_paths", "overlay", "prepare_output_folder", "remove_temporaries", "unique_stems", "write_json", "write_png",
]
