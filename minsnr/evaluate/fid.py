"""`minsnr fid SAMPLES --ref REF`: FID of generated samples (section 4.1: 50K samples) against a reference.

Features: the standard FID Inception-v3 pool3 (2048-d, the TF-ported weights that pytorch-fid, ADM's
evaluator and torch-fidelity use) through torch-fidelity's FeatureExtractorInceptionV3, or with
`--features classifier` the penultimate layer of a small CNN (`fid_cls`, see classifier.py; not comparable
with published FIDs). The Frechet distance is computed in float64 (frechet.py).

REF is an ADM reference batch (npz with `mu` and `sigma`, e.g. VIRTUAL_imagenet256_labeled.npz, used as is
for Inception features), an npz of uint8 images (first of arr_0, x_train, images, x; or --ref-key) or an
image folder. Statistics computed from REF are cached in a per-user folder (--cache-dir; default
$XDG_CACHE_HOME/minsnr/fid, else ~/.cache/minsnr/fid), one file per REF path and feature extractor, and
reused while REF's size and modification time (a folder's: also its listing) are unchanged. Grayscale
images are repeated to 3 channels for Inception; Inception resizes every image to 299x299 itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from minsnr.checkpoint import CheckpointError, load_checkpoint
from minsnr.distributed import resolve_device
from minsnr.evaluate.classifier import classifier_paths, feature_fn, fid_cls, load_classifier
from minsnr.evaluate.frechet import feature_stats, frechet_distance
from minsnr.evaluate.images import ImageSet, open_images, open_npz, read_npy
from minsnr.evaluate.util import HelpFormatter, progress, run_verb

Stats = tuple[np.ndarray, np.ndarray]
FeatureFn = Callable[[np.ndarray], np.ndarray]


def inception_default_path() -> Path:
    """Where torch-fidelity (through torch.hub) looks for, and downloads, the Inception weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID Inception-v3 returning pool3 features; `weights`: a local weights file (a state
    dict saved with torch.save), else the torch.hub cache, else a download."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError(
            "Inception FID needs torch-fidelity: pip install 'minsnr[fid]' (or use --features classifier)"
        ) from err
    not_weights = f"{weights} is not an Inception weights file (a state dict saved by torch.save)"
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"Inception weights file {weights} not found")
    if weights is not None:  # torch-fidelity reads it with weights_only=False: read it safely first
        try:
            load_checkpoint(weights)  # weights_only; a text file, a foreign pickle, a truncated file fail
        except CheckpointError:
            raise ValueError(not_weights) from None
    try:
        model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=None if weights is None else str(weights)
        )
    except OSError as err:
        raise RuntimeError(
            f"could not load the FID Inception weights ({err}). Without network, download {URL_INCEPTION_V3} "
            f"elsewhere and put it at {inception_default_path()}, or pass its path with --inception-weights PATH"
        ) from err
    except RuntimeError:  # load_state_dict: other weights than Inception's
        if weights is None:
            raise
        raise ValueError(not_weights) from None
    return model.to(device)


def inception_fn(model: torch.nn.Module, device: str | torch.device) -> FeatureFn:
    """uint8 [B, H, W, C] -> pool3 features [B, 2048] (grayscale repeated to RGB)."""

    @torch.no_grad()
    def features(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return model(x.contiguous().to(device))[0].double().cpu().numpy()

    return features


def compute_stats(batches: Iterable[np.ndarray], fn: FeatureFn) -> Stats:
    return feature_stats(np.concatenate([fn(b) for b in batches]))


def _source_id(path: Path) -> str:
    """Changes when the file (or the folder's listing) changes."""
    st = path.stat()
    count = sum(1 for _ in path.iterdir()) if path.is_dir() else 0
    return f"{st.st_size}:{st.st_mtime_ns}:{count}"


def cached_stats(cache: Path, source: str, compute: Callable[[], Stats]) -> Stats:
    """Statistics from the file `cache` if it was written for the same `source` id, else computed and
    written there (a warning, not an error, when the folder is read-only)."""
    if cache.is_file():
        try:
            with open_npz(cache) as z:
                if str(read_npy(z, "source")) == source:
                    return read_npy(z, "mu"), read_npy(z, "sigma")
        except ValueError:  # a damaged cache file: computed again and replaced
            pass
    mu, sigma = compute()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, source=source)
        tmp.replace(cache)
    except OSError as err:
        print(f"warning: could not cache reference statistics at {cache}: {err}", file=sys.stderr)
    return mu, sigma


def file_tag(path: str | Path) -> str:
    """Short content hash: cached statistics follow the weights, not the file name."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]


def default_cache_dir() -> Path:
    """Where reference statistics are cached unless --cache-dir says otherwise: the user's cache folder
    ($XDG_CACHE_HOME, else ~/.cache), not the reference's folder, which may be shared or read-only."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minsnr" / "fid"


def reference_stats(
    ref: str | Path,
    fn: FeatureFn,
    tag: str,
    *,
    batch_size: int = 100,
    key: str | None = None,
    cache_dir: str | Path | None = None,
) -> Stats:
    """(mu, sigma) of REF: an ADM batch's own mu/sigma for Inception features, else computed and cached in
    `cache_dir` (default: `default_cache_dir()`) as <name>.<hash of REF's absolute path>.<tag>.stats.npz,
    valid while REF's size and modification time (a folder's: also its listing) hold."""
    ref = Path(ref)
    if tag.startswith("inception") and ref.is_file():
        with open_npz(ref) as z:
            if {"mu.npy", "sigma.npy"} <= set(z.namelist()):
                return read_npy(z, "mu").astype(np.float64), read_npy(z, "sigma").astype(np.float64)
    images = open_images(ref, key)
    where = str(ref.resolve())
    cache = (
        Path(cache_dir or default_cache_dir())
        / f"{ref.name}.{hashlib.sha256(where.encode()).hexdigest()[:12]}.{tag}.stats.npz"
    )
    batches = progress(images.batches(batch_size), images.count, f"reference features ({ref.name})")
    return cached_stats(cache, f"{where}:{images.key}:{_source_id(ref)}", lambda: compute_stats(batches, fn))


def check_classifier_shape(classifier: str | Path, meta: dict, *image_sets: tuple[str, ImageSet]) -> None:
    """Every image set must have the classifier's input shape; checked before any feature is computed."""
    want = tuple(meta["image_shape"])
    wrong = [f"the {name} {s.path} are {s.shape}" for name, s in image_sets if tuple(s.shape) != want]
    if wrong:
        raise ValueError(
            f"classifier {classifier} takes images of shape {want} (H, W, C), but "
            + " and ".join(wrong)
            + "; use a classifier trained on images of that shape (minsnr train-classifier)"
        )


def compute_fid(
    samples: str | Path,
    ref: str | Path,
    *,
    features: str = "inception",
    classifier: str | Path | None = None,
    inception_weights: str | Path | None = None,
    batch_size: int = 100,
    device: str = "auto",
    ref_key: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """{"fid": ...} (Inception) or {"fid_cls": ..., "cls_acc": ...} (classifier; cls_acc when samples have
    labels) of the images in `samples` (npz or folder) against `ref`; reference statistics cached in
    `cache_dir` (see `reference_stats`)."""
    dev = resolve_device(device)
    sample_set: ImageSet = open_images(samples)
    sample_batches = progress(sample_set.batches(batch_size), sample_set.count, "sample features")
    if features == "inception":
        fn = inception_fn(load_inception(inception_weights, dev).eval(), dev)
        tag = "inception" if inception_weights is None else f"inception-{file_tag(inception_weights)}"
        ref_stats = reference_stats(ref, fn, tag, batch_size=batch_size, key=ref_key, cache_dir=cache_dir)
        mu, sigma = compute_stats(sample_batches, fn)
        return {"fid": frechet_distance(mu, sigma, *ref_stats), "num_samples": sample_set.count}
    if features == "classifier":
        if classifier is None:
            raise ValueError("--features classifier needs --classifier PATH (from `minsnr train-classifier`)")
        model, meta = load_classifier(classifier, dev)
        ref_set = open_images(ref, ref_key)
        check_classifier_shape(classifier, meta, ("samples", sample_set), ("reference images", ref_set))
        tag = f"fid_cls-{file_tag(classifier_paths(classifier)[0])}"
        ref_stats = reference_stats(
            ref, feature_fn(model, meta, dev), tag, batch_size=batch_size, key=ref_key, cache_dir=cache_dir
        )
        out = fid_cls(model, meta, sample_batches, ref_stats, sample_set.labels, dev)
        return {**out, "num_samples": sample_set.count}
    raise ValueError(f"features={features!r} is not valid; choose one of: inception, classifier")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minsnr fid", description=__doc__, formatter_class=HelpFormatter)
    path = os.path.expanduser
    p.add_argument("samples", type=path, help="npz (arr_0 uint8 NHWC, arr_1 labels) or image folder")
    p.add_argument(
        "--ref", required=True, type=path, help="ADM reference batch npz (mu, sigma), npz of images or folder"
    )
    p.add_argument("--ref-key", default=None, help="image array in the REF npz (default: arr_0, x_train, ...)")
    p.add_argument(
        "--features",
        choices=("inception", "classifier"),
        default="inception",
        help="Inception-v3 pool3 (standard FID) or a small classifier's features (fid_cls)",
    )
    p.add_argument("--classifier", default=None, type=path, help="classifier from `minsnr train-classifier` (fid_cls)")
    p.add_argument(
        "--inception-weights",
        default=None,
        type=path,
        help="local Inception weights file (default: the torch.hub cache, else download)",
    )
    p.add_argument("--batch", type=int, default=100, help="images per feature batch")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--json", default=None, type=path, help="also write the result to this JSON file")
    p.add_argument(
        "--cache-dir",
        default=None,
        type=path,
        help="folder for cached reference statistics (default: $XDG_CACHE_HOME/minsnr/fid, else ~/.cache/minsnr/fid)",
    )
    a = p.parse_args(argv)
    return run_verb("minsnr fid", lambda: _report(a))


def _report(a: argparse.Namespace) -> int:
    out = compute_fid(
        a.samples,
        a.ref,
        features=a.features,
        classifier=a.classifier,
        inception_weights=a.inception_weights,
        batch_size=a.batch,
        device=a.device,
        ref_key=a.ref_key,
        cache_dir=a.cache_dir,
    )
    print("  ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in out.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({**out, "samples": a.samples, "ref": a.ref, "features": a.features}))
    return 0
