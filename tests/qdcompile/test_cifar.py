"""CIFAR-10 data and the ResNet-56 feature extractor used for FID/KID of 32×32 colour images."""

import pytest
import torch

from qdcompile.data import load_cifar10


def _data_or_skip():
    try:
        return load_cifar10("heldout")
    except FileNotFoundError as e:
        pytest.skip(f"shared CIFAR-10 data absent: {e}")


def test_splits_are_disjoint_and_shaped():
    x_held, y_held = _data_or_skip()
    x_train, y_train = load_cifar10("train")
    assert x_held.shape == (1017, 3, 32, 32) and x_train.shape == (5085 + 10000 - 1017, 3, 32, 32)
    assert x_held.dtype == torch.uint8 and y_train.max() == 9
    # the held-out images are the test set's first 1017; training uses test images from 1017 on
    assert not any(torch.equal(x_held[i], x_train[5085]) for i in range(x_held.shape[0]))
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        load_cifar10("test")


def test_resnet56_features_classify_held_out_images():
    from qdcompile.cifar_features import load_resnet56

    x, y = _data_or_skip()
    try:
        model = load_resnet56()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:256]
    with torch.no_grad():
        acc = (model(x[idx].float() / 255).argmax(1) == y[idx]).float().mean().item()
        feats = model.features(x[idx].float() / 255)
    assert acc > 0.85   # the published 93.4%, on 256 random held-out images
    assert feats.shape == (256, 64)


def test_fid_of_real_against_noise_is_large_and_against_itself_small():
    from qdcompile.evaluation.fid import FeatureSpace

    x, _ = _data_or_skip()
    real = x.float() / 255
    try:
        space = FeatureSpace(real[:500], extractor="cifar10", backend="builtin", kid_subsets=10)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    same = space(real[500:1000])
    noise = space(torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert noise["fid"] > 20 * same["fid"] and noise["kid_mean"] > same["kid_mean"]
    with pytest.raises(ValueError, match="builtin"):
        FeatureSpace(real[:10], extractor="cifar10", backend="torch-fidelity")
