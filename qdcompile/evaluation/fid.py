"""FID and KID: the offline feature extractors (MNIST classifier, CIFAR-10 ResNet-56, Inception-v3),
the torch-fidelity or builtin backends, and the real-image subsets."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..cifar_features import default_weights_path, load_resnet56
from ..classifier import DEFAULT_CLASSIFIER_PATH, load_mnist_classifier
from ..data import load_cifar10, load_mnist
from .configs import uncorrected_counterparts
from .metrics import colour_moments, colour_w2, frechet_distance, to_uint8

#: Name under which the MNIST-classifier feature extractor is registered with torch-fidelity.
MNIST_FEATURES = "qdcompile-mnist-classifier"


INCEPTION_FEATURES = "inception-v3-compat"


FID_NOTE = ("FID/KID here use the features of the project's MNIST classifier (128-d), not Inception-v3: "
            "they rank the configurations against each other and are NOT comparable to published FIDs.")


INCEPTION_NOTE = "FID/KID use Inception-v3 (inception-v3-compat) features from the weights given."


CIFAR_FEATURES = "cifar10-resnet56"


CIFAR_NOTE = ("FID/KID here use the 64-d pooled features of the shared CIFAR-10 ResNet-56 classifier, not "
              "Inception-v3, against 1017 held-out CIFAR-10 test images: they rank the configurations against "
              "each other and are NOT comparable to published FIDs.")


# The real-image subset is drawn with its own fixed seed, so that runs with different --seed
# values compare against the same real images.
REAL_SUBSET_SEED = 0


class FidelityUnavailable(RuntimeError):
    """torch-fidelity cannot be imported; the message says why and what to do."""


def _import_torch_fidelity():
    try:
        import torch_fidelity
    except ModuleNotFoundError as e:
        if e.name == "torch_fidelity":
            cpu_note = ("; note that the extra needs the CUDA build of torch: with this CPU-only torch "
                        f"{torch.__version__} PyPI's torchvision cannot load and `import diffusers` breaks"
                        if torch.version.cuda is None else "")
            raise FidelityUnavailable(
                f"FID/KID need torch-fidelity, which is not installed: pip install -e \".[eval]\"{cpu_note}. "
                "Or pass --fid-backend builtin (qdcompile's own implementation of the same FID/KID formulas, "
                "MNIST-classifier features only), or --no-fid.") from e
        raise FidelityUnavailable(_torchvision_message(e)) from e
    except (ImportError, RuntimeError, OSError) as e:
        raise FidelityUnavailable(_torchvision_message(e)) from e
    return torch_fidelity


def _torchvision_message(e: BaseException) -> str:
    return (f"torch-fidelity is installed but cannot be imported ({type(e).__name__}: {e}). It imports "
            f"torchvision, which must be the build matching torch {torch.__version__}; PyPI's Linux torchvision "
            "wheels are CUDA builds, so a CPU-only torch has no matching torchvision on PyPI (and where one is "
            "installed anyway, `import diffusers` fails too: uninstall it). Use a CUDA torch with its torchvision and "
            "pip install -e \".[eval]\", or pass --fid-backend builtin (same FID/KID formulas, MNIST-classifier "
            "features only), or --no-fid.")


def uint8_to_mnist(x: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's uint8 ``[N, 1|3, H, W]`` (0–255) → the classifier's ``[N, 1, 28, 28]`` in [0, 1]."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1 or 3, H, W] (0-255), got {x.dtype} {tuple(x.shape)}")
    y = x.float().div(255.0).mean(dim=1, keepdim=True)
    if tuple(y.shape[-2:]) != (28, 28):
        y = torch.nn.functional.interpolate(y, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return y


@torch.no_grad()
def _mnist_features(classifier, x_uint8: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, ...]:
    param = next(classifier.parameters())
    feats = classifier.features(uint8_to_mnist(x_uint8).to(param))
    out = {"features": feats, "logits": classifier.head(feats)}
    return tuple(out[name].float() for name in layers)


def register_mnist_feature_extractor() -> str:
    """Register the MNIST-classifier features with torch-fidelity (once); return the name.

    Features: ``"features"`` (128-d penultimate layer, used for FID and KID) and ``"logits"``.
    Input: torch-fidelity's uint8 ``[N, 3, H, W]`` in 0–255 (gray images replicated; 1 channel
    also accepted), resized to 28×28 if needed. ``feature_extractor_weights_path`` loads another
    classifier checkpoint (default: the shipped one).
    """
    _import_torch_fidelity()
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if MNIST_FEATURES in FEATURE_EXTRACTORS_REGISTRY:
        return MNIST_FEATURES

    class MnistClassifierFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)

            self.classifier = load_mnist_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits"}.get(metric, "features")

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

        def forward(self, x):
            return _mnist_features(self.classifier, x, self.features_list)

    register_feature_extractor(MNIST_FEATURES, MnistClassifierFeatures)
    return MNIST_FEATURES


class _UInt8Images(torch.utils.data.Dataset):
    """A uint8 ``[N, 3, H, W]`` tensor as the Dataset torch-fidelity reads (one tensor per item)."""

    def __init__(self, images_uint8: torch.Tensor):
        self.images = images_uint8.expand(-1, 3, -1, -1) if images_uint8.shape[1] == 1 else images_uint8

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].contiguous()


def _sha256(path) -> Optional[str]:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def kernel_distance(f1: torch.Tensor, f2: torch.Tensor, subset_size: int, subsets: int = 100,
                    seed: int = 2020) -> tuple[float, float]:
    """KID: unbiased MMD² with the kernel ``k(x, y) = (x·y / D + 1)³`` over ``subsets`` random
    subsets of ``subset_size`` rows of each set (drawn without replacement, set 1 then set 2, from
    ``numpy.random.RandomState(seed)``, as torch-fidelity draws them); returns (mean, std)."""
    import numpy as np

    n1, n2 = f1.shape[0], f2.shape[0]
    if subset_size > min(n1, n2):
        raise ValueError(f"KID subset size {subset_size} is larger than a feature set ({n1}, {n2})")
    if subset_size < 2:
        raise ValueError(f"KID needs subset_size >= 2, got {subset_size}")
    f1, f2 = f1.double(), f2.double()
    d, m = f1.shape[1], subset_size
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        a = f1[torch.from_numpy(rng.choice(n1, m, replace=False))]
        b = f2[torch.from_numpy(rng.choice(n2, m, replace=False))]
        kaa, kbb, kab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
        within = (kaa.sum() - kaa.diagonal().sum() + kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
        values.append(float(within - 2 * kab.sum() / (m * m)))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


def paired_fid_delta(f1: torch.Tensor, f2: torch.Tensor, real: torch.Tensor, boots: int = 200,
                     seed: int = 0, distance: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None
                     ) -> dict[str, Any]:
    """``FID(f1) − FID(f2)`` against ``real`` with a paired bootstrap 95% interval.

    Row ``i`` of both generated sets comes from the same seed (same initial noise), so one
    resampled index set serves both: the interval shows whether a difference between two
    configurations exceeds the noise of drawing ``N`` samples (the real set stays fixed).
    ``distance`` replaces the Fréchet distance (e.g. :func:`colour_w2` on colour moments).
    """
    distance = frechet_distance if distance is None else distance
    if f1.shape != f2.shape:
        raise ValueError(f"paired ΔFID needs sample sets of one shape, got {list(f1.shape)} and {list(f2.shape)}")
    n = f1.shape[0]
    gen = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(boots):
        idx = torch.randint(0, n, (n,), generator=gen)
        deltas.append(distance(f1[idx], real) - distance(f2[idx], real))
    d = torch.tensor(deltas, dtype=torch.float64)
    lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"delta": distance(f1, real) - distance(f2, real), "ci95": [lo, hi], "boots": boots}


class FeatureSpace:
    """Computes FID/KID of image sets against one real set, with the real features computed once.

    ``extractor``: ``"mnist"`` (the project's classifier) or ``"inception"`` (needs
    ``inception_weights``, a local ``inception-v3-compat`` weights file). ``backend``:
    ``"torch-fidelity"`` or ``"builtin"`` (MNIST classifier only). Images are floats in [0, 1].
    """

    def __init__(self, real: torch.Tensor, *, extractor: str = "mnist", backend: str = "torch-fidelity",
                 inception_weights: Optional[str] = None, classifier_weights: Optional[str] = None,
                 device: str = "cpu", kid_subsets: int = 100, seed: int = 2020, batch_size: int = 256):
        if extractor not in ("mnist", "inception", "cifar10"):
            raise ValueError(f"extractor must be 'mnist', 'cifar10' or 'inception', got {extractor!r}")
        if extractor == "cifar10" and backend != "builtin":
            raise ValueError("the CIFAR-10 ResNet-56 features run with --fid-backend builtin (they are not "
                             "registered with torch-fidelity)")
        if backend not in ("torch-fidelity", "builtin"):
            raise ValueError(f"backend must be 'torch-fidelity' or 'builtin', got {backend!r}")
        if extractor == "inception":
            if inception_weights is None:
                raise ValueError("Inception-v3 features need a local weights file (--inception-weights PATH); "
                                 "nothing is downloaded")
            if not Path(inception_weights).is_file():
                raise FileNotFoundError(f"--inception-weights {inception_weights!r}: no such file")
            if backend == "builtin":
                raise ValueError("--fid-backend builtin has only the MNIST-classifier features; "
                                 "Inception-v3 needs torch-fidelity")
        self.extractor, self.backend, self.device = extractor, backend, device
        self.kid_subsets, self.seed, self.batch_size = kid_subsets, seed, batch_size
        self.inception_weights, self.classifier_weights = inception_weights, classifier_weights
        self.real = to_uint8(real)
        self._real_colour = colour_moments(self.real)
        self._cache_dir: Optional[tempfile.TemporaryDirectory] = None
        if backend == "torch-fidelity":
            _import_torch_fidelity()
            self.name = register_mnist_feature_extractor() if extractor == "mnist" else INCEPTION_FEATURES
            self._cache_dir = tempfile.TemporaryDirectory(prefix="qdcompile-fidelity-")
        elif extractor == "cifar10":
            self.name = CIFAR_FEATURES
            self._classifier = load_resnet56(classifier_weights, device=device)
            self._real_features = self._builtin_features(self.real)
        else:
            self.name = MNIST_FEATURES
            self._classifier = load_mnist_classifier(classifier_weights, device=device)
            self._real_features = self._builtin_features(self.real)

    @property
    def note(self) -> str:
        return {"mnist": FID_NOTE, "cifar10": CIFAR_NOTE}.get(self.extractor, INCEPTION_NOTE)

    def describe(self) -> dict[str, Any]:
        if self.extractor == "cifar10":
            default = default_weights_path()
        else:
            default = DEFAULT_CLASSIFIER_PATH
        weights = self.inception_weights if self.extractor == "inception" else (self.classifier_weights or default)
        return {"feature_extractor": self.name, "backend": self.backend, "weights": str(weights),
                "weights_sha256": _sha256(weights), "real_images": self.real.shape[0],
                "kid_subsets": self.kid_subsets, "kid_seed": self.seed, "note": self.note}

    def _builtin_features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        def feats(x):
            if self.extractor == "cifar10":
                with torch.no_grad():
                    return self._classifier.features(x.to(self.device).float() / 255.0).double().cpu()
            return _mnist_features(self._classifier, x, ("features",))[0].cpu()

        return torch.cat([feats(images_uint8[i:i + self.batch_size])
                          for i in range(0, images_uint8.shape[0], self.batch_size)])

    def features(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Features of ``images`` (floats in [0, 1]) with the builtin backend; None with torch-fidelity."""
        return self._builtin_features(to_uint8(images)) if self.backend == "builtin" else None

    def fid_deltas(self, rows: Sequence[dict[str, Any]], samples: dict[str, torch.Tensor]) -> None:
        """Each quantized row gets paired-bootstrap differences against FP and, for a row with PTQD
        corrections, against the uncorrected row of the same recipe and precision plan:
        ``colour_delta`` (colour W2 vs real; any backend) and, with the builtin backend,
        ``fid_delta`` and ``fid_vs_fp_samples`` (its FID against the FP samples instead of the real
        images)."""
        if "fp" not in samples:
            return
        colour = {k: colour_moments(v) for k, v in samples.items()}
        feats = {k: self.features(v) for k, v in samples.items()} if self.backend == "builtin" else None
        for r in rows:
            if r.get("status") != "ok" or r["key"] == "fp" or r["key"] not in samples:
                continue
            refs = ["fp"] + [k for k in uncorrected_counterparts(r["key"]) if k in samples]
            r["colour_delta"] = [{"vs": ref, **paired_fid_delta(colour[r["key"]], colour[ref], self._real_colour,
                                                                distance=colour_w2)} for ref in refs]
            if feats is None:
                continue
            r["fid_delta"] = [{"vs": ref, **paired_fid_delta(feats[r["key"]], feats[ref], self._real_features)}
                              for ref in refs]
            # distance to what the float model draws (FP's samples as the reference set)
            r["fid_vs_fp_samples"] = frechet_distance(feats[r["key"]], feats["fp"])

    def kid_subset_size(self, num_generated: int) -> int:
        return min(1000, num_generated, self.real.shape[0])

    def __call__(self, generated: torch.Tensor) -> dict[str, float]:
        """``{"fid", "kid_mean", "kid_std", "kid_subset_size", "colour_w2"}`` of ``generated`` against
        the real set."""
        gen = to_uint8(generated)
        m = self.kid_subset_size(gen.shape[0])
        colour = {"colour_w2": colour_w2(colour_moments(gen), self._real_colour)}
        if self.backend == "builtin":
            feats = self._builtin_features(gen)
            fid = frechet_distance(feats, self._real_features)
            kid_mean, kid_std = kernel_distance(feats, self._real_features, m, self.kid_subsets, self.seed)
            return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": m, **colour}
        torch_fidelity = _import_torch_fidelity()
        kwargs: dict[str, Any] = {}
        weights = self.inception_weights if self.extractor == "inception" else self.classifier_weights
        if weights is not None:
            kwargs["feature_extractor_weights_path"] = str(weights)
        metrics = torch_fidelity.calculate_metrics(
            input1=_UInt8Images(gen), input2=_UInt8Images(self.real), fid=True, kid=True,
            feature_extractor=self.name, kid_subset_size=m, kid_subsets=self.kid_subsets, rng_seed=self.seed,
            batch_size=self.batch_size, cuda=str(self.device).startswith("cuda"), save_cpu_ram=True,
            verbose=False, cache=True, cache_root=self._cache_dir.name,
            input2_cache_name=f"real-{self.real.shape[0]}", **kwargs)
        return {"fid": float(metrics["frechet_inception_distance"]),
                "kid_mean": float(metrics["kernel_inception_distance_mean"]),
                "kid_std": float(metrics["kernel_inception_distance_std"]), "kid_subset_size": m, **colour}

    def close(self) -> None:
        if self._cache_dir is not None:
            self._cache_dir.cleanup()
            self._cache_dir = None


def fid_kid(generated: torch.Tensor, real: torch.Tensor, **kwargs) -> dict[str, float]:
    """FID and KID of ``generated`` against ``real`` (both ``[N, C, H, W]`` in [0, 1]); keyword
    arguments as :class:`FeatureSpace`. For several sets against one real set, keep one
    :class:`FeatureSpace` (the real features are computed once)."""
    space = FeatureSpace(real, **kwargs)
    try:
        return space(generated)
    finally:
        space.close()


def real_mnist_images(n: int = 10000, seed: int = REAL_SUBSET_SEED) -> torch.Tensor:
    """A fixed random subset of ``n`` MNIST test images, ``[n, 1, 28, 28]`` floats in [0, 1]."""
    images, _ = load_mnist("t10k")
    if not 2 <= n <= images.shape[0]:
        raise ValueError(f"real-image count must be in [2, {images.shape[0]}], got {n}")
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx].unsqueeze(1).float().div(255.0)


def real_cifar10_images() -> Optional[torch.Tensor]:
    """The 1017 held-out CIFAR-10 test images (lossless, never trained on) as floats in [0, 1]."""
    try:
        images, _ = load_cifar10("heldout")
    except FileNotFoundError:
        return None
    return images.float().div(255.0)
