"""Frechet distance against scipy, and the Inception FID path end to end offline (random weights)."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch

from minsnr.evaluate import fid
from minsnr.evaluate.frechet import feature_stats, frechet_distance


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("n1,n2", [(500, 400), (20, 400), (400, 20)])  # 20 < d: singular covariance
def test_frechet_matches_independent_formulas(n1, n2):
    rng = np.random.default_rng(0)
    d = 32
    a = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    b = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=d)
    sa, sb = feature_stats(a), feature_stats(b)
    np.testing.assert_allclose(sa[1], np.cov(a.T), rtol=1e-12)
    ours = frechet_distance(*sa, *sb)
    # pytorch-fid / torch-fidelity style: eigenvalues of the (non-symmetric) product
    tr = np.sqrt(np.linalg.eigvals(sa[1] @ sb[1]).astype(complex)).real.sum()
    ref = float(((sa[0] - sb[0]) ** 2).sum() + np.trace(sa[1]) + np.trace(sb[1]) - 2 * tr)
    assert ref > 1.0 and abs(ours - ref) <= 1e-6 * ref
    if min(n1, n2) > d:
        assert abs(ours - scipy_frechet(*sa, *sb)) <= 1e-6 * ref
    assert abs(frechet_distance(*sb, *sa) - ours) <= 1e-9 * ref  # symmetric


@pytest.mark.parametrize("n", [300, 40])  # 40 < d: singular covariance
def test_frechet_of_a_set_with_itself_is_zero(n):
    x = np.random.default_rng(1).normal(size=(n, 64)) * 3 + 1
    assert abs(frechet_distance(*feature_stats(x), *feature_stats(x))) < 1e-6


def test_frechet_rejects_mismatched_stats():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> str:
    """A state dict of a freshly constructed (randomly initialised) torch-fidelity Inception, saved with
    torch.save: the library's weights format, with meaningless values."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with pytest.MonkeyPatch.context() as mp:  # construct without downloading or loading any weights
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        model = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in model.modules():  # He init keeps activations O(1) through the 90-odd layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_inception_fid_end_to_end_offline_with_cache(random_inception, tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache_dir = tmp_path / "xdg" / "minsnr" / "fid"  # the default: the user's cache, not the data's folder
    rng = np.random.default_rng(0)
    ref_imgs = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)  # grayscale, other size: both allowed
    np.savez(tmp_path / "ref.npz", arr_0=ref_imgs)
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.arange(3))
    (tmp_path / "ref_png").mkdir()
    for i, img in enumerate(ref_imgs):
        Image.fromarray(img).save(tmp_path / "ref_png" / f"{i}.png")

    calls = []
    real = fid.compute_stats
    monkeypatch.setattr(fid, "compute_stats", lambda batches, fn: calls.append(1) or real(batches, fn))
    ref = tmp_path / "ref.npz"
    args = ["--ref", str(ref), "--inception-weights", random_inception, "--device", "cpu", "--batch", "3"]
    assert fid.main([str(tmp_path / "samples.npz"), *args, "--json", str(tmp_path / "a.json")]) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and result["num_samples"] == 3
    assert len(calls) == 2  # reference and samples
    assert "reference features (ref.npz): 100%" in capsys.readouterr().err  # a progress bar
    caches = list(cache_dir.glob("ref.npz.*.inception-*.stats.npz"))
    assert len(caches) == 1 and not list(tmp_path.glob("*.stats.npz"))
    tag = caches[0].name.split(".", 3)[3][: -len(".stats.npz")]
    with np.load(caches[0]) as z:
        mu, sigma = z["mu"], z["sigma"]
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu.std() > 0
    mtime = caches[0].stat().st_mtime_ns

    # second time: from the cache, nothing recomputed or rewritten
    fn = fid.inception_fn(fid.load_inception(random_inception), "cpu")
    mu2, _ = fid.reference_stats(ref, fn, tag)
    assert len(calls) == 2 and caches[0].stat().st_mtime_ns == mtime and np.array_equal(mu, mu2)
    # the same images read from a PNG folder (other batch size) give the same statistics
    mu3, sigma3 = fid.reference_stats(tmp_path / "ref_png", fn, tag, batch_size=4)
    assert len(calls) == 3 and len(list(cache_dir.glob(f"ref_png.*.{tag}.stats.npz"))) == 1
    np.testing.assert_allclose(mu3, mu, rtol=1e-4, atol=1e-6 * np.abs(mu).max())
    np.testing.assert_allclose(sigma3, sigma, rtol=1e-3, atol=1e-5 * np.abs(sigma).max())
    # a changed reference invalidates its cache
    np.savez(ref, arr_0=ref_imgs[:3])
    fid.reference_stats(ref, fn, tag)
    assert len(calls) == 4
    # another cache folder on request; a reference of the same name elsewhere gets its own entry
    mine = tmp_path / "mine"
    assert fid.main([str(tmp_path / "samples.npz"), *args, "--cache-dir", str(mine)]) == 0
    assert len(calls) == 6 and len(list(mine.glob(f"ref.npz.*.{tag}.stats.npz"))) == 1
    (tmp_path / "other").mkdir()
    np.savez(tmp_path / "other" / "ref.npz", arr_0=ref_imgs[:3])
    fid.reference_stats(tmp_path / "other" / "ref.npz", fn, tag)
    assert len(calls) == 7 and len(list(cache_dir.glob(f"ref.npz.*.{tag}.stats.npz"))) == 2
    # an ADM reference batch (mu, sigma) is used as is, nothing computed or cached
    np.savez(tmp_path / "adm.npz", mu=np.arange(3.0), sigma=np.eye(3), arr_0=ref_imgs)
    mu, sigma = fid.reference_stats(tmp_path / "adm.npz", fn, "inception")
    assert mu.tolist() == [0, 1, 2] and sigma.tolist() == np.eye(3).tolist()
    assert len(calls) == 7 and not list(tmp_path.glob("adm.npz.*")) and not list(cache_dir.glob("adm.npz.*"))


def test_inception_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as err:
        fid.load_inception()
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in msg
    assert "--inception-weights" in msg and tf_inception.URL_INCEPTION_V3 in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fid.load_inception(tmp_path / "nope.pth")


def test_fid_bad_arguments_are_named(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="inception, classifier"):
        fid.compute_fid(tmp_path / "s.npz", tmp_path / "s.npz", features="clip", device="cpu")
    assert fid.main([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--features", "classifier"]) == 1
    assert "needs --classifier" in capsys.readouterr().err
    assert (
        fid.main(
            [
                str(tmp_path / "nope.npz"),
                "--ref",
                str(tmp_path / "s.npz"),
                "--features",
                "classifier",
                "--classifier",
                "x",
            ]
        )
        == 1
    )
    assert "nope.npz" in capsys.readouterr().err
