"""Audit settings (``audit:`` in a task config) and the rule they parameterise, as the report states it."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AuditThresholds(BaseModel):
    """Audit settings (``audit:`` in a task config). Unknown keys are errors.

    Pixel decisions use only the data's noise (see ``hallucination``); these numbers set the
    false-alarm rate, what counts as a region, and how bad a region must be to need review or fail.
    """

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(1e-3, gt=0.0, lt=0.5, description="per-pixel false-alarm rate of the significance tests")
    min_region_size: int | None = Field(
        None, ge=1, description="pixels/voxels on the SR grid; default: 2 LR pixels along every axis")
    review_risk: float = Field(1.0, gt=0.0, description="calibrated peak risk that needs review (1.0: the "
                               "calibration's review threshold)")
    fail_risk: float = Field(2.0, gt=0.0, description="calibrated peak risk that fails (2.0: the calibration's "
                             "fail threshold)")
    region_floor: float = Field(0.5, ge=0.0, lt=1.0, description="flagged pixels whose own calibrated risk is below "
                                "this share of review_risk join no region (hysteresis: a strong flag does not "
                                "swallow the weak flags around it)")
    min_gain_db: float = Field(0.0, description="held-out: mean PSNR gain over the baseline below this is 'review'")
    noise_method: Literal["mad-haar", "fixed"] = "mad-haar"
    noise_sigma: list[float] | None = Field(None, description="per-band noise sigma (data units) for 'fixed'")
    tta: Literal["off", "flips", "dihedral"] = "flips"
    tta_max: int = Field(4, ge=2, le=48, description="augmentations including the identity")
    tta_streamed: bool = Field(False, description="test-time augmentation also in the whole-scene audit of a "
                               "streamed raster (a full tile): off by default, as it re-runs the model "
                               "tta_max - 1 more times over the whole scene (a full Sentinel-2 tile: ~3x the "
                               "enhancement time); the LR-consistency and conformal terms cover every pixel "
                               "either way")
    baseline: Literal["cubic", "linear", "lanczos"] = "cubic"
    max_figure_regions: int = Field(6, ge=0, le=50)

    @model_validator(mode="after")
    def _check(self) -> AuditThresholds:
        if self.fail_risk < self.review_risk:
            raise ValueError("fail_risk must be >= review_risk")
        if self.noise_method == "fixed" and not self.noise_sigma:
            raise ValueError("noise_method 'fixed' needs noise_sigma (one value per band)")
        return self


RULE_TEXT = (
    "Per band, in units of the noise sigma: d = SR - baseline (what the model added), r = baseline - truth. "
    "Over a Gaussian window about one LR pixel wide, excess = mean((d + r)^2) - mean(r^2): the extra error "
    "energy of SR over the baseline. Noise-level texture costs about 1, so a pixel is hallucinated when "
    "excess - 1 > z(alpha) s, s = 2 sqrt(sum w^2 (0.5 + mean_w2(d^2) + mean_w2(r^2))) being the spread of "
    "the excess that noise causes, and the addition is not a smoothing of the baseline towards its local "
    "level mu (mean_w(d (d + baseline - mu)) > 0); improved when -excess > z 2 sqrt(sum w^2 mean_w2(d^2)); omitted when "
    "the baseline's error is significantly above "
    "noise and was not reduced. Flags are then shrunk to the pixels that carry the excess. "
    "Score = (RMS error of SR - RMS error of baseline) / max(RMS error of baseline, noise); significantly worse "
    "than the baseline without adding structure is lost detail (omission). Truth = the HR "
    "reference (held-out) or the LR input after re-degrading SR and baseline (LR consistency). Regions: "
    "connected flagged pixels >= min_region_size whose own calibrated risk is at least region_floor x review_risk "
    "(hysteresis); a region's peak score becomes its risk through the fitted "
    "calibration (risk 1 at the review threshold, 2 at the fail threshold that honest outputs reach at the stated "
    "rate / never); the verdict is a function of the peak risk alone (review_risk, fail_risk). An inconsistency "
    "region that is mostly unstable under TTA gets hypot(its risk, the spread's risk); omission and uncertainty "
    "alone are at most a review."
)

__all__ = ["RULE_TEXT", "AuditThresholds"]
