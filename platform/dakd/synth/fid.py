"""Generation metrics: Fréchet distance (FID) and Inception Score (IS), and the feature
extractors they run on.

Statistics stream: ``RunningStats`` keeps n, Σx and Σxxᵀ in float64, so sets of any size
are scored without holding their features; ``ISAccumulator`` keeps, per split, Σp and
Σ p·log p of the class probabilities, which is all IS needs.

Extractors map images uint8 (B, H, W) to (features (B, D) float, probabilities (B, K) or
None):
- ``inception``: torchvision InceptionV3 (weights from a local file or URI, torchvision's
  layout; they cannot be downloaded here): 2048-d pool features and the 1000-way softmax.
  Grey images are repeated to 3 channels, resized to 299×299 (bilinear) and normalised
  with ImageNet's mean/std (``transform_input=True``, as torchvision's pretrained model).
  Values are comparable between runs of this platform, not bit-for-bit with the
  TF-Inception FID of the paper.
- ``pixels``: grey levels normalised to [-1, 1] (data.transforms) and average-pooled to
  size×size (torch's adaptive pooling windows, in NumPy); no class probabilities, so IS is
  not defined (None).
- ``"package.module:function"``: any callable with the signature above (or returning
  only features).
"""

from __future__ import annotations

import importlib

import numpy as np

from dakd import storage
from dakd.data.transforms import normalize_image
from dakd.errors import ConfigError
from dakd.weights import read_state_dict

INCEPTION_SIZE = 299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- statistics
class RunningStats:
    """Mean and covariance of a stream of feature rows (float64 sums)."""

    def __init__(self):
        self.n = 0
        self.sum = None
        self.outer = None

    def update(self, features: np.ndarray) -> None:
        """features (B, D)."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features: expected (B, D), got shape {f.shape}")
        if self.sum is None:
            self.sum = np.zeros(f.shape[1])
            self.outer = np.zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (D, D) (n - 1 in the denominator, as np.cov)."""
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.n}")
        mu = self.mean
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh; negative
    round-off eigenvalues set to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1^½ Σ2 Σ1^½)^½): the Fréchet distance of two
    Gaussians. tr((Σ1Σ2)^½) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (the same eigenvalues as Σ1Σ2), which stays real and
    stable for the singular covariances of small sets."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt, 0.0))


class ISAccumulator:
    """Inception Score over `splits` groups: IS_s = exp(E_x[KL(p(y|x) ‖ p_s(y))]) with p_s the
    split's marginal; reports mean and std over the non-empty splits."""

    def __init__(self, splits: int):
        self.splits = splits
        self.n = np.zeros(splits, dtype=np.int64)
        self.sum_p = None
        self.sum_plogp = np.zeros(splits)

    def update(self, probs: np.ndarray, split: np.ndarray) -> None:
        """probs (B, K) rows summing to 1; split (B,) ints in [0, splits)."""
        p = np.asarray(probs, dtype=np.float64)
        if self.sum_p is None:
            self.sum_p = np.zeros((self.splits, p.shape[1]))
        plogp = (p * np.log(np.clip(p, 1e-30, None))).sum(axis=1)
        np.add.at(self.n, split, 1)
        np.add.at(self.sum_p, split, p)
        np.add.at(self.sum_plogp, split, plogp)

    def score(self) -> tuple[float, float]:
        scores = []
        for s in np.nonzero(self.n)[0]:
            marginal = self.sum_p[s] / self.n[s]
            kl = self.sum_plogp[s] / self.n[s] - (marginal * np.log(np.clip(marginal, 1e-30, None))).sum()
            scores.append(np.exp(kl))
        return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- extractors
def pixel_features(images: np.ndarray, size: int = 8) -> np.ndarray:
    """images uint8 (B, H, W) -> (B, size*size) float64: normalised, average-pooled with
    adaptive pooling's windows (torch's adaptive_avg_pool2d: output i averages rows
    floor(i*H/size) .. ceil((i+1)*H/size) - 1; exact block means when H and W are multiples
    of size). NumPy only, so a pixels FID actor does not import torch."""
    x = normalize_image(np.asarray(images)).astype(np.float64)
    return _adaptive_mean(_adaptive_mean(x, size, axis=1), size, axis=2).reshape(len(x), -1)


def _adaptive_mean(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Means over adaptive pooling's `size` windows along `axis` (prefix sums: one pass)."""
    n = x.shape[axis]
    starts = (np.arange(size) * n) // size
    ends = -((-np.arange(1, size + 1) * n) // size)  # ceil((i+1)*n/size)
    prefix = np.concatenate([np.zeros_like(np.take(x, [0], axis=axis)), np.cumsum(x, axis=axis)], axis=axis)
    sums = np.take(prefix, ends, axis=axis) - np.take(prefix, starts, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = size
    return sums / (ends - starts).reshape(shape)


def load_inception(weights: str | None):
    """torchvision InceptionV3 in eval mode with the weights of `weights` (a .safetensors or
    torch state-dict file, path or URI); ConfigError when it is not set, absent or wrong."""
    from torchvision.models import inception_v3

    if not weights:
        raise ConfigError("inception_weights: not set. features=inception needs InceptionV3 weights in torchvision's "
                          "layout as a local file (e.g. inception_v3_google-0cc3c7bd.pth; they cannot be downloaded "
                          "here); or use features=pixels")
    if not storage.exists(weights):
        raise ConfigError(f"inception_weights: {weights}: file not found (expected InceptionV3 weights in "
                          "torchvision's layout, .pth or .safetensors)")
    state = read_state_dict(weights, "inception_weights:")
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ConfigError(f"inception_weights: {weights}: not InceptionV3 weights in torchvision's layout "
                          f"({str(exc).splitlines()[0][:200]})") from None
    return model.eval()


class InceptionExtractor:
    """images uint8 (B, H, W) -> (pool features (B, 2048), softmax (B, 1000))."""

    def __init__(self, weights: str | None, device: str = "cpu"):
        import torch

        self.device = torch.device(device)
        self.model = load_inception(weights).to(self.device)
        self._pool = None
        self.model.avgpool.register_forward_hook(lambda m, i, o: setattr(self, "_pool", o))
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: np.ndarray):
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.asarray(images, dtype=np.uint8)).to(self.device).float().div(255.0)[:, None]
            x = torch.nn.functional.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                                align_corners=False).repeat(1, 3, 1, 1)
            logits = self.model((x - self.mean) / self.std)
            return (self._pool.flatten(1).double().cpu().numpy(),
                    torch.softmax(logits.double(), dim=1).cpu().numpy())


def make_extractor(spec: str, *, pixels_size: int = 8, inception_weights: str | None = None, device: str = "cpu"):
    """Config `features` -> callable images uint8 (B, H, W) -> (features (B, D), probs (B, K) | None)."""
    if spec == "inception":
        return InceptionExtractor(inception_weights, device)
    if spec == "pixels":
        return lambda images: (pixel_features(images, pixels_size), None)
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"features: {spec!r} cannot be imported ({exc}); expected inception, pixels or "
                          "package.module:function") from None

    def call(images):
        out = fn(images)
        feats, probs = out if isinstance(out, tuple) else (out, None)
        return np.asarray(feats, dtype=np.float64).reshape(len(images), -1), probs

    return call
