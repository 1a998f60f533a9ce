"""The windowed audit equals the whole-image audit: maps, metrics and regions, at any window size,
in memory and from raster files (bounded memory, risk map written window by window)."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.audit import AuditThresholds, audit_output, interpolation_enhancer
from domainsr.audit import windowed as win
from domainsr.audit.hallucination import box_iou
from domainsr.audit.noise import estimate_noise, estimate_noise_windows, sample_windows
from domainsr.audit.protocol import audit_files
from domainsr.degrade import noise_free_operator
from tests.audit.conftest import OpticalDegradation, VolumeDegradation, planted

TH = AuditThresholds(tta="off")
MAPS = ("risk", "lr_residual", "lr_classes", "classes", "mask", "uncertainty")


def _pair(ref, degradation, model, seed=0):
    lr_data = degradation(np.asarray(ref.data, np.float32), np.random.default_rng(seed))
    lr = ref.derive(lr_data, geometry=ref.geometry.scaled([0.5] * ref.spatial_dims), mask=None)
    return lr, model(lr)


def _regions(res):
    return [(r.kind, r.bbox_index, r.size, r.peak_risk, r.score, r.band) for r in res.regions]


def _same(a, b, rel=1e-6):
    for name in MAPS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert np.array_equal(x, y), name
    assert _regions(a) == _regions(b)
    assert a.fractions == b.fractions
    ma, mb = a.metrics.model_dump(), b.metrics.model_dump()
    flat = lambda d, p="": ({f"{p}{k}": v for k1, v1 in d.items() for k, v in flat(v1, f"{p}{k1}.").items()}
                            if isinstance(d, dict) else {p: d})
    fa, fb = flat(ma), flat(mb)
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], (str, bool)) or (isinstance(fa[k], list) and fa[k] and isinstance(fa[k][0], str)):
            assert fa[k] == fb[k], k
            continue
        x, y = np.asarray(fa[k], float), np.asarray(fb[k], float)
        assert np.allclose(x, y, rtol=rel, atol=0, equal_nan=True), (k, x, y)


S2_BOX = (slice(58, 70), slice(40, 52))  # 12 x 12 SR px: LR rows 29-34, cols 20-25


@pytest.mark.parametrize("with_reference", [False, True])
def test_windowed_equals_whole_image_on_sentinel2(s2_crop, cubic2d, with_reference):
    model = planted(cubic2d, S2_BOX, np.array([300.0, 300.0, 300.0, 600.0]))
    lr, sr = _pair(s2_crop, OpticalDegradation(), model)
    ref = s2_crop if with_reference else None
    whole = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d)
    assert whole.coverage.windows == 1 and whole.stride == 1
    for window in (40, 64):
        part = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d, window=window)
        assert part.coverage.windows == int(np.ceil(128 / window)) ** 2
        _same(whole, part)
    (reg,) = whole.regions
    assert reg.kind == ("hallucination" if with_reference else "inconsistency")
    assert box_iou(reg.bbox_index, [[58, 69], [40, 51]]) > 0.9


def test_planted_square_across_a_seam_is_one_region_with_its_box(s2_crop, cubic2d):
    """Seam at SR row/col 64 (window 64): the square straddles it along both axes."""
    box = (slice(56, 72), slice(58, 70))
    model = planted(cubic2d, box, np.array([300.0, 300.0, 300.0, 600.0]))
    lr, sr = _pair(s2_crop, OpticalDegradation(), model)
    for ref in (None, s2_crop):
        whole = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d)
        calls: list[tuple[int, int]] = []

        def progress(i, n, calls=calls):
            calls.append((i, n))

        part = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d, window=64, progress=progress)
        assert part.coverage.windows == 4 and calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
        _same(whole, part)
        (reg,) = part.regions
        assert reg.bbox_index == [[56, 71], [58, 69]] and reg.size == 16 * 12


def test_a_region_names_the_band_that_carries_it_across_a_seam(s2_crop, cubic2d):
    """A block planted in one band only (B04, index 2) is one region naming that band, with and
    without a reference, whole and windowed (the seam at SR row/col 64 cuts it)."""
    box = (slice(56, 72), slice(58, 70))
    model = planted(cubic2d, box, np.array([0.0, 0.0, 500.0, 0.0]))
    lr, sr = _pair(s2_crop, OpticalDegradation(), model)
    for ref in (None, s2_crop):
        whole = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d)
        part = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d, window=64)
        _same(whole, part)
        (reg,) = part.regions
        assert reg.band == s2_crop.band_names[2] == "B04"
        assert reg.model_dump(mode="json")["band"] == "B04"


def test_flags_one_lr_pixel_apart_merge_into_one_region(s2_crop, cubic2d):
    """Two planted squares 2 SR px (one LR pixel) apart are one region; 6 px apart, two."""
    amp = np.array([300.0, 300.0, 300.0, 600.0])
    near = planted(planted(cubic2d, (slice(40, 52), slice(40, 50)), amp), (slice(40, 52), slice(52, 62)), amp)
    far = planted(planted(cubic2d, (slice(40, 52), slice(40, 50)), amp), (slice(40, 52), slice(56, 66)), amp)
    for model, count in ((near, 1), (far, 2)):
        lr, sr = _pair(s2_crop, OpticalDegradation(), model)
        res = audit_output(sr, lr, s2_crop, thresholds=TH, baseline=cubic2d, window=48)
        assert len(res.regions) == count, _regions(res)
    assert res.regions[0].size + res.regions[1].size == 2 * 12 * 10  # sizes count flagged pixels only


@pytest.mark.parametrize("window", [32, 48, 1024])
def test_honest_cubic_output_has_no_region_at_any_window_size(s2_crop, cubic2d, window):
    lr, sr = _pair(s2_crop, OpticalDegradation(), cubic2d)
    for ref in (None, s2_crop):
        res = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d, window=window)
        assert res.regions == [] and res.verdict in ("pass", "review")


def test_windowed_equals_whole_in_3d(mni_block, cubic3d):
    model = planted(cubic3d, (slice(20, 30), slice(30, 40), slice(24, 34)), np.array([60.0]))
    deg = VolumeDegradation()
    lr, sr = _pair(mni_block, deg, model)
    down = noise_free_operator(deg, (2, 2, 2), 1)
    whole = audit_output(sr, lr, None, down, thresholds=TH, baseline=cubic3d)
    part = audit_output(sr, lr, None, down, thresholds=TH, baseline=cubic3d, window=32)
    assert part.coverage.windows == 8 and part.coverage.window_shape == [32, 32, 32]
    _same(whole, part)
    (reg,) = whole.regions
    assert box_iou(reg.bbox_index, [[20, 29], [30, 39], [24, 33]]) >= 0.9


def test_tta_uncertainty_per_window_equals_whole(s2_crop):
    """A torch model with a known receptive radius runs per window under TTA (its halo included)."""
    import torch

    from domainsr.audit import as_enhancer
    from domainsr.models import build_model

    torch.manual_seed(0)
    net = build_model("rescnn", spatial_dims=2, in_channels=4, scale=(2, 2), n_blocks=1, n_feats=8)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(50.0)  # a noticeably unstable model
    lr = s2_crop.derive(OpticalDegradation()(np.asarray(s2_crop.data, np.float32), np.random.default_rng(0)),
                        geometry=s2_crop.geometry.scaled([0.5, 0.5]), mask=None)
    sr = as_enhancer(net)(lr)
    th = AuditThresholds(tta="flips", tta_max=3)
    whole = audit_output(sr, lr, thresholds=th, model=net)
    part = audit_output(sr, lr, thresholds=th, model=net, window=64)
    assert part.coverage.windows == 4 and whole.uncertainty is not None and float(whole.uncertainty.max()) > 0
    assert np.allclose(whole.uncertainty, part.uncertainty, rtol=1e-5, atol=1e-6)
    assert part.noise.uncertainty.method == "tta-flips"
    assert [(r.kind, r.bbox_index, r.size) for r in whole.regions] == [(r.kind, r.bbox_index, r.size)
                                                                      for r in part.regions]


def _write(img, path):
    from domainsr.io import write_image

    write_image(img.derive(np.round(np.clip(np.asarray(img.data, np.float32), 0, 65535)).astype(np.uint16)), path)


def test_audit_files_equals_the_in_memory_audit(s2_crop, cubic2d, tmp_path):
    from domainsr.io import read_image

    model = planted(cubic2d, S2_BOX, np.array([300.0, 300.0, 300.0, 600.0]))
    lr, sr = _pair(s2_crop, OpticalDegradation(), model)
    for img, name in ((lr, "lr"), (sr, "sr"), (s2_crop, "ref")):
        _write(img, tmp_path / f"{name}.tif")
    lr_f, sr_f, ref_f = (read_image(tmp_path / f"{n}.tif") for n in ("lr", "sr", "ref"))
    for ref_path, ref in ((None, None), (tmp_path / "ref.tif", ref_f)):
        mem = audit_output(sr_f, lr_f, ref, thresholds=TH)
        out = tmp_path / "risk.tif"
        disk = audit_files(tmp_path / "sr.tif", tmp_path / "lr.tif", ref_path, thresholds=TH, risk_map_path=out,
                           window=48)
        _same(mem, disk)
        assert disk.noise.lr_sigma == mem.noise.lr_sigma and disk.coverage.noise_sampling == "the whole image"
        risk = read_image(out)
        assert risk.band_names == ("risk", "class") and np.array_equal(risk.data[0], disk.risk)
        cls = disk.classes if disk.classes is not None else disk.lr_classes
        assert np.array_equal(risk.data[1], cls.astype(np.float32))
        summary = disk.summary()
        assert summary.coverage.windows == 9 and summary.coverage.scene_fraction == 1.0
        assert summary.coverage.window_shape == [48, 48] and summary.coverage.sr_pixels == 128 * 128
        assert summary.grid.sr_shape == [128, 128] and summary.coverage.valid_fraction == 1.0


def test_large_scene_overview_and_crop(s2_crop, cubic2d, tmp_path, monkeypatch):
    """Past the overview budget the result's arrays are decimated by ``stride`` (block max of the
    risk), and ``crop`` recomputes a full-resolution window equal to the full map there."""
    model = planted(cubic2d, S2_BOX, np.array([300.0, 300.0, 300.0, 600.0]))
    lr, sr = _pair(s2_crop, OpticalDegradation(), model)
    _write(lr, tmp_path / "lr.tif")
    _write(sr, tmp_path / "sr.tif")
    full = audit_files(tmp_path / "sr.tif", tmp_path / "lr.tif", thresholds=TH, risk_map_path=tmp_path / "r.tif")
    monkeypatch.setattr(win, "OVERVIEW_PIXELS", 64 * 64)
    small = audit_files(tmp_path / "sr.tif", tmp_path / "lr.tif", thresholds=TH, window=48)
    assert small.stride == 2 and small.coverage.stride == 2 and small.risk.shape == (64, 64)
    assert small.sr.spatial_shape == (64, 64) and small.lr.spatial_shape == (64, 64)
    assert np.array_equal(small.risk, full.risk.reshape(64, 2, 64, 2).max(axis=(1, 3)))
    assert _regions(small) == _regions(full)
    crop = small.crop(small.regions[0], margin_px=8)
    (a0, a1), (b0, b1) = crop.coverage.box
    assert crop.stride == 1 and crop.risk.shape == (a1 - a0 + 1, b1 - b0 + 1)
    assert np.array_equal(crop.risk, full.risk[a0:a1 + 1, b0:b1 + 1])
    assert crop.regions[0].bbox_index == full.regions[0].bbox_index


def test_noise_from_sampled_windows(monkeypatch):
    import domainsr.audit.noise as nz

    rng = np.random.default_rng(0)
    small = rng.normal(0, 3.0, (2, 300, 300)).astype(np.float32)
    read = lambda box: (small[(slice(None), *(slice(a, b) for a, b in box))], None)
    sigma, how = estimate_noise_windows(read, small.shape[1:])
    assert how == "the whole image" and np.array_equal(sigma, estimate_noise(small))
    boxes = sample_windows((3000, 3000), budget=1_000_000, side=256)
    assert len(boxes) == 9 and all(b - a == 256 for box in boxes for a, b in box)
    big = lambda box: (rng.normal(0, 3.0, (1, *(b - a for a, b in box))), None)
    sigma, how = estimate_noise_windows(big, (3000, 3000))
    assert abs(sigma[0] - 3.0) < 0.1 and how.startswith("225 windows of 128x128")
    monkeypatch.setitem(nz.SAMPLE_SIDE, 2, 2000)  # one central window is not "the whole image"
    _, how = estimate_noise_windows(big, (3000, 3000))
    assert how == "1 window of 2000x2000 px on a regular grid (44.4% of the image)"


def test_sampled_noise_tracks_the_whole_image_on_a_real_scene(sample_data):
    """Many small windows follow a real scene's whole-image noise where a few large ones follow
    the content they land on: the real Sentinel-2 sample (4 x 1947 x 1933 px) sampled with a
    quarter of its pixels' budget, against the estimate on every pixel."""
    from domainsr.io import read_image

    d = np.asarray(read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"]).data)
    read = lambda box: (d[(slice(None), *(slice(a, b) for a, b in box))], None)
    whole = estimate_noise(d, integer_valued=True)
    many, how = estimate_noise_windows(read, d.shape[1:], True, budget=1_000_000)
    assert how.startswith("49 windows of 128x128") and np.all(np.abs(many / whole - 1) < 0.03)
    few, how = estimate_noise_windows(read, d.shape[1:], True, budget=1_000_000, side=512)
    assert how.startswith("1 window of 512x512") and np.any(np.abs(few / whole - 1) > 0.1)  # B04 7.66 vs 9.88 DN


def test_halo_covers_each_reach():
    assert win.rule_reach((1.0,)) == (3 + 9 + 2,)
    cubic = interpolation_enhancer("cubic", 1, (2, 2))
    core, halo, _ = win.plan((100, 100), (2, 2), 64, cubic, win.area((2, 2)), 1, None, False)
    assert core == (32, 32) and halo[0] >= 14 + 2 + 1
    kspace = noise_free_operator({"kind": "mri", "scale": 2, "rician_sigma": 0.0}, (2, 2, 2), 1)
    core, halo, notes = win.plan((20, 20, 20), (2, 2, 2), 16, interpolation_enhancer("cubic", 1, (2, 2, 2)),
                                    kspace, 1, None, False)
    assert core == (20, 20, 20) and halo == (0, 0, 0) and "one window" in notes[0]


def _ball(shape, center, radius):
    g = np.indices(shape, dtype=np.float32)
    rho = np.sqrt(sum((gi - c) ** 2 for gi, c in zip(g, center)))
    return np.clip(radius + 0.5 - rho, 0.0, 1.0)


@pytest.mark.parametrize("radius_lr,center,sign", [(2, (30, 34, 30), 1.0), (3, (32, 30, 34), -1.0),
                                                   (4, (32, 32, 32), 1.0)])
def test_a_planted_blob_is_localised_without_a_reference_in_3d(mni_block, cubic3d, radius_lr, center, sign):
    """A soft ball (radius in LR voxels, 5 noise sigma or the local contrast) planted in a cubic
    MNI152 output: found without a reference as one region whose box has IoU >= 0.7 with the ball's."""
    deg = VolumeDegradation()
    lr, base = _pair(mni_block, deg, cubic3d)
    ball = _ball(mni_block.spatial_shape, center, 2 * radius_lr)
    local = float(np.asarray(base.data)[(0, *(slice(c - 8, c + 9) for c in center))].std())
    sr = base.derive(np.asarray(base.data, np.float32) + sign * max(local, 5.0) * ball[None])
    res = audit_output(sr, lr, None, noise_free_operator(deg, (2, 2, 2), 1), thresholds=TH, baseline=cubic3d)
    truth = [[int(i.min()), int(i.max())] for i in np.nonzero(ball > 0)]
    (reg,) = res.regions
    assert reg.kind == "inconsistency" and box_iou(reg.bbox_index, truth) >= 0.7


@pytest.mark.parametrize("corner", [(1264, 640), (400, 400)])
def test_a_planted_blob_is_localised_without_a_reference_in_2d(sample_data, cubic2d, corner):
    from domainsr.io import read_image

    img = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    (r0, c0), n = corner, 128
    ref = img.derive(np.ascontiguousarray(img.data[:, r0:r0 + n, c0:c0 + n]),
                     geometry=img.geometry.cropped((r0, c0), (n, n)), mask=None)
    lr, base = _pair(ref, OpticalDegradation(), cubic2d)
    for radius_lr, center in ((2, (40, 40)), (3, (64, 80))):
        ball = _ball((n, n), center, 2 * radius_lr)
        local = np.asarray(base.data)[(slice(None), *(slice(c - 8, c + 9) for c in center))].reshape(4, -1).std(1)
        sr = base.derive(np.asarray(base.data, np.float32) + np.maximum(local, 20.0)[:, None, None] * ball[None])
        res = audit_output(sr, lr, thresholds=TH, baseline=cubic2d, window=64)
        truth = [[int(i.min()), int(i.max())] for i in np.nonzero(ball > 0)]
        (reg,) = res.regions
        assert box_iou(reg.bbox_index, truth) >= 0.7


def test_windowed_equals_whole_with_invalid_pixels(s2_crop, cubic2d):
    """Nodata (a masked strip and hole in the reference and SR, a NaN LR pixel): masks, eroded
    metric footprints and fills agree window by window."""
    model = planted(cubic2d, S2_BOX, np.array([300.0, 300.0, 300.0, 600.0]))
    lr, sr = _pair(s2_crop, OpticalDegradation(), model)
    lr_data = np.array(lr.data, np.float32)
    lr_data[:, 40, 10] = np.nan
    lr = lr.derive(lr_data)
    mask = np.ones(s2_crop.spatial_shape, bool)
    mask[:10] = False
    mask[70:80, 90:100] = False
    ref = s2_crop.derive(s2_crop.data, mask=mask)
    sr = sr.derive(sr.data, mask=mask)
    whole = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d)
    part = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d, window=40)
    assert not whole.mask[:10].any() and not whole.mask[80:82, 20:22].any()
    _same(whole, part)
    honest = cubic2d(lr)
    for ref_ in (None, ref):
        res = audit_output(honest.derive(honest.data, mask=mask), lr, ref_, thresholds=TH, baseline=cubic2d, window=40)
        assert res.regions == [] and np.isfinite(res.metrics.lr_consistency.lr_psnr.baseline).all()


def test_windowed_equals_whole_on_a_synthetic_image_at_an_odd_scale(s2_crop):
    """A synthetic smooth field with noise at scale 3 (Gaussian-then-mean degradation), with a reference."""
    from scipy import ndimage as ndi

    from domainsr.degrade import build_degradation

    rng = np.random.default_rng(3)
    hr = np.stack([ndi.gaussian_filter(rng.normal(size=(99, 99)), 3.0) * 400 + 1000 for _ in range(2)])
    hr = hr.astype(np.float32) + rng.normal(0, 2.0, hr.shape).astype(np.float32)
    geom = s2_crop.geometry.cropped((0, 0), (99, 99))
    ref = s2_crop.derive(hr, geometry=geom, band_names=("a", "b"), mask=None)
    deg = build_degradation({"kind": "gaussian_mean", "scale": [3, 3], "sigma": 1.0})
    lr = ref.derive(deg(hr, None), geometry=geom.scaled((1 / 3, 1 / 3)))
    cubic = interpolation_enhancer("cubic", 2, (3, 3))
    base = cubic(lr)
    sr = base.derive(np.asarray(base.data) + np.where(_ball((99, 99), (50, 45), 7.0) > 0, 150.0, 0.0)[None])
    down = noise_free_operator(deg, (3, 3), 2)
    for reference in (None, ref):
        whole = audit_output(sr, lr, reference, down, thresholds=TH, baseline=cubic)
        part = audit_output(sr, lr, reference, down, thresholds=TH, baseline=cubic, window=30)
        assert part.coverage.windows == 16
        _same(whole, part)
        assert len(whole.regions) == 1


def test_crop_of_an_in_memory_audit_is_the_full_audit_there(s2_crop, cubic2d):
    model = planted(cubic2d, S2_BOX, np.array([300.0, 300.0, 300.0, 600.0]))
    lr, sr = _pair(s2_crop, OpticalDegradation(), model)
    for ref in (None, s2_crop):
        full = audit_output(sr, lr, ref, thresholds=TH, baseline=cubic2d)
        crop = full.crop(full.regions[0], margin_px=5)
        assert crop.coverage.box == [[52, 75], [34, 57]]  # the box +- 5 px, out to whole LR pixels
        sl = tuple(slice(a, b + 1) for a, b in crop.coverage.box)
        for name in ("risk", "lr_residual", "lr_classes", "mask"):
            assert np.array_equal(getattr(crop, name), getattr(full, name)[sl]), name
        assert np.array_equal(crop.sr.data, full.sr.data[(slice(None), *sl)])
        assert _regions(crop) == _regions(full) and crop.coverage.scene_fraction == round(24 * 24 / 128 ** 2, 6)


def test_memory_does_not_grow_with_the_number_of_windows(s2_crop, cubic2d, tmp_path, monkeypatch):
    """Nothing a window computed outlives it (a kept view of a window's array grew a full tile's
    audit to 9 GB): the traced memory after the last window is about that after the fourth (the
    conformal pixel sample, capped at 256 pixels here, is all that is kept)."""
    import tracemalloc

    monkeypatch.setattr(win, "CONFORMAL_SAMPLES", 256)
    lr, sr = _pair(s2_crop, OpticalDegradation(), cubic2d)
    _write(lr, tmp_path / "lr.tif")
    _write(sr, tmp_path / "sr.tif")
    seen: dict[int, int] = {}

    def progress(i: int, n: int) -> None:
        if i in (4, n):
            seen[i] = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        audit_files(tmp_path / "sr.tif", tmp_path / "lr.tif", thresholds=TH, window=32, progress=progress)
    finally:
        tracemalloc.stop()
    assert len(seen) == 2
    window_bytes = 4 * 4 * 32 * 32  # one window's SR core, float32
    grown = seen[max(seen)] - seen[4]
    assert grown < 8 * window_bytes, f"memory grew by {grown} bytes over 12 windows"  # the bug: 16x


def test_with_a_reference_an_inconsistency_repeating_a_reference_region_is_dropped():
    from domainsr.audit.hallucination import make_region

    def reg(kind, box):
        return make_region(kind=kind, size=9, bbox=box, centroid=[0.0, 0.0], peak_score=5.0, mean_score=5.0,
                           evidence=None, geometry=None, domain="optical")

    hal_r = reg("hallucination", [[10, 29], [10, 29]])
    inside = reg("inconsistency", [[12, 31], [12, 31]])  # 81 % of its box inside the hallucination's
    elsewhere = reg("inconsistency", [[50, 60], [50, 60]])
    assert win.without_repeats([hal_r, inside, elsewhere]) == [hal_r, elsewhere]
    assert win.without_repeats([inside, elsewhere]) == [inside, elsewhere]  # reference-free: all kept


def test_with_a_reference_an_lr_inconsistent_plant_the_truth_misses_is_still_reported(s2_crop, cubic2d):
    """The LR-consistency check runs with a reference too: where the reference rule is blind (the
    'truth' itself carries the plant), the inconsistency with the LR input is still flagged."""
    box = (slice(58, 70), slice(40, 52))
    amp = np.array([300.0, 300.0, 300.0, 600.0])
    lr, sr = _pair(s2_crop, OpticalDegradation(), planted(cubic2d, box, amp))
    fake_truth = sr  # a reference that agrees with the SR: no hallucination against it
    res = audit_output(sr, lr, fake_truth, thresholds=TH, baseline=cubic2d)
    kinds = {r.kind for r in res.regions if r.verdict != "pass"}
    assert "inconsistency" in kinds and "hallucination" not in kinds


def test_the_median_bound_uses_the_fitted_weights_and_a_sampled_grid_keeps_it(s2_crop, cubic2d, tmp_path,
                                                                              monkeypatch):
    """The report's median bound ``q u`` is computed with the domain's fitted weights of ``u`` (a
    windowed audit once used weights 1, 1, 1 with the ``q`` fitted for others); with every weight 0
    ``u`` is the noise alone. A file audit samples ``u`` on a regular grid of pixels (here one in
    8 x 8): the median moves by a few percent at most."""
    from domainsr.audit import protocol
    from domainsr.audit.calibration import load_calibration

    lr, sr = _pair(s2_crop, OpticalDegradation(), cubic2d)
    whole = audit_output(sr, lr, thresholds=TH, baseline=cubic2d)
    cal = load_calibration().model_copy(deep=True)
    cb = cal.conformal("optical")
    assert cb is not None and cb.weights != [1.0, 1.0, 1.0]
    cb.weights = [0.0, 0.0, 0.0]
    monkeypatch.setattr(protocol, "load_calibration", lambda: cal)
    noise_only = audit_output(sr, lr, thresholds=TH, baseline=cubic2d)
    assert noise_only.conformal.median_bound == pytest.approx([cb.q * v for v in noise_only.noise.lr_sigma], rel=1e-3)
    assert all(a > b for a, b in zip(whole.conformal.median_bound, noise_only.conformal.median_bound))
    monkeypatch.undo()
    monkeypatch.setattr(win, "CONFORMAL_SAMPLES", 256)
    _write(lr, tmp_path / "lr.tif")
    _write(sr, tmp_path / "sr.tif")
    files = audit_files(tmp_path / "sr.tif", tmp_path / "lr.tif", thresholds=TH, baseline=cubic2d, window=32)
    assert win.conformal_grid(sr.data.shape[1:]) == 8  # 128^2 SR px, 256 samples
    assert files.conformal.median_bound == pytest.approx(whole.conformal.median_bound, rel=0.08)  # 4 % here


def test_the_sampled_grid_is_one_global_grid_whatever_the_windows(s2_crop, cubic2d, monkeypatch):
    """The conformal scale's sample grid is one regular grid from the audited box's first pixel, so
    windows of any size sample the same pixels with the same values (a window-relative grid would
    drop or repeat rows at the cores' edges): the median bound of 32 px windows is the one-window one."""
    lr, sr = _pair(s2_crop, OpticalDegradation(), cubic2d)
    monkeypatch.setattr(win, "CONFORMAL_SAMPLES", 100)  # 128^2 px: step 12, not a divisor of the cores
    assert win.conformal_grid(sr.data.shape[1:]) == 12
    one = audit_output(sr, lr, thresholds=TH, baseline=cubic2d)
    many = audit_output(sr, lr, thresholds=TH, baseline=cubic2d, window=40)
    assert many.conformal.median_bound == pytest.approx(one.conformal.median_bound, rel=1e-5)
