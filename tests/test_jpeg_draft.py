"""JPEG draft-mode decoding for the training crop: the reduction chosen, the guarantee it rests on, and the
crops it gives against full decoding."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from trainer.image_files import decode
from trainer.jpeg_draft import draft_for_random_crop
from test_gpu_input import RECIPE, photo

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def recipe_crop():
    return create_transform(**RECIPE).transforms[0]


def test_reduction_is_the_largest_that_keeps_every_box_at_least_the_output_size(recipe_crop):
    draft = draft_for_random_crop(create_transform(**RECIPE))
    # shortest possible box side: sqrt(0.08 * 3/4 * W * H) = 0.2449 sqrt(W H); halved while it stays >= 224
    assert draft.reduction(500, 375) == 1  # 106 px: ImageNet-sized photos decode in full
    assert draft.reduction(2200, 1650) == 2  # 466 -> 233
    assert draft.reduction(4000, 3000) == 2  # 849 -> 424 (212 at 1/4 would be too small)
    assert draft.reduction(8000, 6000) == 4  # 1697 -> 424
    assert draft.reduction(16000, 12000) == 8  # libjpeg's largest reduction
    assert draft_for_random_crop(create_transform(32, is_training=False)) is None
    random.seed(0)
    for _ in range(3000):  # on the reduced image every box the crop draws spans the output size
        _, _, h, w = recipe_crop.get_params(Image.new('RGB', (2000, 1500)), recipe_crop.scale, recipe_crop.ratio)
        assert min(h, w) >= 224


def test_draft_decoding_gives_the_full_decodes_crops(tmp_path, recipe_crop):
    big = photo(550, 412).resize((2200, 1650), Image.BICUBIC)  # cheaper to make than a 2200 px photo()
    big.save(tmp_path / 'big.jpg', quality=90)
    Image.new('RGB', big.size).save(tmp_path / 'big.png')
    draft = draft_for_random_crop(create_transform(**RECIPE))
    reduced = decode(tmp_path / 'big.jpg', prepare=draft)
    assert reduced.size == (1100, 825) and decode(tmp_path / 'big.png', prepare=draft).size == (2200, 1650)
    full = decode(tmp_path / 'big.jpg')
    diffs = []
    for seed in range(8):  # the same seed draws the same box relative to the picture, up to pixel rounding
        crops = []
        for image in (full, reduced):
            random.seed(seed)
            torch.manual_seed(seed)
            crops.append(np.asarray(recipe_crop(image), dtype=np.float32))
        diffs.append(np.abs(crops[0] - crops[1]).mean())
    assert max(diffs) < 1.5, diffs
