"""Gaussian statistics of features and the Frechet distance between them, in float64 (no scipy needed)."""

from __future__ import annotations

import numpy as np
import torch


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64 (as ADM / pytorch-fid)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^1/2) for symmetric PSD S1, S2, in float64.

    With A = L L^T (Cholesky of S1, or of S2 if S1 is singular; the symmetric square root if both are),
    L^T B L is symmetric PSD with the spectrum of S1 S2, so the trace is the sum of square roots of its
    eigenvalues (eigvalsh). Eigenvalues below D * eps * the largest are rounding noise and count as 0. This
    is stable for singular covariances (fewer samples than dimensions), where sqrtm(S1 S2) can turn complex.
    """
    s1 = torch.from_numpy(np.asarray(sigma1, np.float64))
    s2 = torch.from_numpy(np.asarray(sigma2, np.float64))
    for a, b in ((s1, s2), (s2, s1)):  # noqa: B007 -- the pair the loop stops at is used below
        low, info = torch.linalg.cholesky_ex(a)
        if info.item() == 0:
            break
    else:
        w, v = torch.linalg.eigh((a + a.T) / 2)
        low = (v * w.clamp(min=0).sqrt()) @ v.T
    m = low.T @ b @ low
    ev = torch.linalg.eigvalsh((m + m.T) / 2)
    tol = ev.abs().max() * ev.numel() * torch.finfo(torch.float64).eps
    return float(ev[ev > tol].sqrt().sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), all in float64 (the FID formula)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))
