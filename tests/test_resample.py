"""PIL-exact resampling on tensors (the accelerator path's resizes) against PIL itself, byte for byte."""
import numpy as np
import pytest
import torch
from PIL import Image

from refseg.pipeline.resample import pil_resize

_PIL = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@pytest.mark.parametrize("filter", ["bicubic", "bilinear"])
def test_pil_resize_equals_pil_on_random_images(filter):
    rng = np.random.default_rng(0)
    sizes = [((97, 131), (56, 56)), ((64, 64), (112, 112)), ((300, 200), (518, 518)), ((33, 47), (33, 90)),
             ((120, 80), (60, 80)), ((1, 9), (14, 14)), ((256, 192), (256, 192)), ((80, 300), (273, 1024))]
    for (h, w), (oh, ow) in sizes:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[: h // 3] = 0  # flat areas and hard edges: the rounding cases
        image[h // 2:, w // 2:] = 255
        expected = np.asarray(Image.fromarray(image).resize((ow, oh), _PIL[filter]))
        got = pil_resize(torch.from_numpy(image)[None], (oh, ow), filter)[0]
        np.testing.assert_array_equal(got.permute(1, 2, 0).to(torch.uint8).numpy(), expected,
                                      err_msg=f"{filter} {h}x{w} -> {oh}x{ow}")


def test_pil_resize_batch_is_each_image_alone():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 40, 52, 3), dtype=np.uint8)
    batch = pil_resize(torch.from_numpy(images), (28, 28))
    for i in range(3):
        expected = np.asarray(Image.fromarray(images[i]).resize((28, 28), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(batch[i].permute(1, 2, 0).to(torch.uint8).numpy(), expected)


def test_pil_resize_rejects_other_inputs():
    with pytest.raises(ValueError, match="uint8"):
        pil_resize(torch.zeros(1, 8, 8, 3), (4, 4))
    with pytest.raises(ValueError, match="filter"):
        pil_resize(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), (4, 4), "lanczos")
