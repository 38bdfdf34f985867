"""The GPU input path on CUDA: the CPU-reference checks of tests/test_gpu_input.py on CUDA tensors, nvJPEG
against Pillow, the prefetching loader, and a short training run with --input-pipeline gpu."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from trainer import gpu_input
import main
from test_gpu_input import (RECIPE, check_erasing, check_geometric_ops, check_pixel_ops,
                                  check_prefetching_loader, check_recipe_matches_cpu_transform, check_resized_crop,
                                  write_folder)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.mark.parametrize('check', [check_pixel_ops, check_geometric_ops, check_resized_crop,
                                   check_recipe_matches_cpu_transform, check_erasing])
def test_batched_ops_on_cuda(check):
    check('cuda')


def test_nvjpeg_decodes_as_pillow(tmp_path):
    write_folder(tmp_path, classes=1)
    paths = sorted((tmp_path / 'train' / 'class0').glob('*.jpg'))
    augmentation = gpu_input.TrainAugmentation(create_transform(**{**RECIPE, 'input_size': 32}))
    dataset = gpu_input.EncodedImageDataset([(str(p), 0) for p in paths], augmentation)
    encoded, _, _, names = dataset.collate([dataset[i] for i in range(len(dataset))])
    decoded, unreadable = gpu_input.decode_batch(encoded, torch.device('cuda'))
    assert not unreadable
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    for path, image in zip(paths, decoded):
        want = np.asarray(Image.open(path).convert('RGB'), dtype=np.float32)
        got = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
        # nvJPEG upsamples the subsampled chroma (Pillow writes 4:2:0) differently from libjpeg's smoothing: a
        # few levels of colour at edges. The luma, which chroma upsampling leaves alone, must agree closely.
        assert image.is_cuda and np.abs((got - want) @ luma).mean() < 1.5, path
        assert np.abs(got - want).mean() < 4, path


def test_prefetching_loader_on_cuda(tmp_path):
    check_prefetching_loader('cuda', tmp_path)


def test_training_runs_with_the_gpu_pipeline(tmp_path):
    root = write_folder(tmp_path / 'data')
    code = main.cli(['--model', 'vim_tiny_patch16_224', '--model-kwargs', 'depth=2', 'embed_dim=64',
                        '--input-size', '64', '--data-set', 'folder', '--data-path', str(root), '--batch-size', '8',
                        '--epochs', '1', '--input-pipeline', 'gpu', '--num_workers', '2',
                        '--output_dir', str(tmp_path / 'out'), '--print-freq', '1000'])
    assert code == 0
    record = json.loads((tmp_path / 'out' / 'log.txt').read_text().splitlines()[-1])
    assert np.isfinite(record['train_loss']) and record['test_num_images'] == 2
