"""A tiny MNIST CNN used to judge generated digits.

The classifier is shipped as ``assets/mnist_classifier.safetensors`` and serves two
purposes:

* checking that samples from the reference diffusion model are recognisable digits
  (:func:`digit_metrics`: fraction classified with high confidence, class histogram);
* acting as an offline feature extractor (:meth:`MnistClassifier.features`) for
  FID-like distribution metrics, since no Inception weights are available offline.

Input convention everywhere: float images in ``[0, 1]``, shape ``[N, 1, 28, 28]``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_write

__all__ = [
    "MnistClassifier",
    "DEFAULT_CLASSIFIER_PATH",
    "load_mnist_classifier",
    "train_mnist_classifier",
    "digit_metrics",
]

logger = logging.getLogger(__name__)

DEFAULT_CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "mnist_classifier.safetensors"

# Mean / std of MNIST pixels in [0, 1]; normalisation is done inside the model so
# that callers can always pass plain [0, 1] images.
_MNIST_MEAN = 0.1307
_MNIST_STD = 0.3081


class MnistClassifier(nn.Module):
    """Three conv/pool stages followed by a 128-d hidden layer and a 10-way head (~98k params)."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)  # 28x28 -> pool -> 14x14
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)  # 14x14 -> pool -> 7x7
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)  # 7x7 -> pool -> 3x3
        self.fc = nn.Linear(64 * 3 * 3, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[N, 128]`` (post-ReLU) for images in ``[0, 1]``."""
        x = (x - _MNIST_MEAN) / _MNIST_STD
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, 10]`` for images in ``[0, 1]``, shape ``[N, 1, 28, 28]``."""
        return self.head(self.dropout(self.features(x)))


def load_mnist_classifier(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> MnistClassifier:
    """Load the shipped (or a given) classifier checkpoint, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST classifier weights not found at {path}; "
            "run `python bench/train_reference.py --classifier` to create them"
        )
    model = MnistClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero padding) as augmentation."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(n):
        dy, dx = offsets[i].tolist()
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / x.shape[0]


def train_mnist_classifier(
    out_path: str | os.PathLike | None = None,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 3e-3,
    holdout: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, float]:
    """Train the classifier on MNIST t10k, holding out ``holdout`` images for testing.

    The held-out split is a seeded random permutation, so it is reproducible. The
    weights are written atomically (:func:`qdcompile.io.atomic_write`).

    Returns:
        ``(path, held_out_accuracy)``.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .data import load_mnist

    out_path = Path(out_path) if out_path is not None else DEFAULT_CLASSIFIER_PATH
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    images, labels = load_mnist("t10k")
    x = images.float().div_(255).unsqueeze(1)
    perm = torch.randperm(x.shape[0], generator=gen)
    test_idx, train_idx = perm[:holdout], perm[holdout:]
    x_train, y_train = x[train_idx], labels[train_idx]
    x_test, y_test = x[test_idx], labels[test_idx]

    model = MnistClassifier()
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)

    bar = tqdm(total=total, desc="classifier", disable=not progress)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb = _random_shift(x_train[idx], 2, gen)
            # No label smoothing: real digits should get confidences near 1 so that
            # "confidence > 0.9" separates clean samples from ambiguous ones.
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = _accuracy(model, x_test, y_test)
        logger.info("classifier epoch %d/%d: held-out accuracy %.4f", epoch + 1, epochs, acc)
    bar.close()

    acc = _accuracy(model, x_test, y_test)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_path, lambda tmp: save_file(state, tmp, metadata={
        "heldout_accuracy": f"{acc:.4f}", "holdout": str(holdout), "seed": str(seed)}))
    logger.info("saved MNIST classifier to %s (held-out accuracy %.4f)", out_path, acc)
    return out_path, acc


@torch.no_grad()
def digit_metrics(
    images: torch.Tensor,
    classifier: MnistClassifier | None = None,
    threshold: float = 0.9,
    batch_size: int = 500,
) -> dict:
    """Summarise how digit-like a batch of generated images is.

    Args:
        images: ``[N, 1, 28, 28]`` floats in ``[0, 1]`` (clamped).
        classifier: defaults to the shipped one.
        threshold: softmax confidence above which a sample counts as "confident".

    Returns:
        dict with ``confident_fraction`` (float), ``mean_confidence`` (float),
        ``histogram`` (list of 10 ints, argmax class counts) and ``predictions``
        (int64 tensor ``[N]``).
    """
    clf = classifier if classifier is not None else load_mnist_classifier()
    clf.eval()
    param = next(clf.parameters())
    probs = torch.cat(
        [
            clf(images[i : i + batch_size].to(param).clamp(0, 1)).softmax(-1).cpu()
            for i in range(0, images.shape[0], batch_size)
        ]
    )
    conf, pred = probs.max(-1)
    return {
        "confident_fraction": (conf > threshold).float().mean().item(),
        "mean_confidence": conf.mean().item(),
        "histogram": torch.bincount(pred, minlength=10).tolist(),
        "predictions": pred,
    }
