"""ECE by hand; sequential temperature scaling on a synthetic, known miscalibration."""

import math

import pytest
import torch

from specserve.speculative.calibration import (
    apply_sts,
    expected_calibration_error,
    fit_sts,
    load_sts,
    save_sts,
    survival_ece,
)


def test_ece_hand_cases():
    probs = torch.tensor([0.1, 0.1, 0.9, 0.9])
    labels = torch.tensor([0, 1, 1, 1])
    # bin [0.1, 0.2): |0.1 - 0.5| * 2/4 ; bin [0.9, 1.0]: |0.9 - 1| * 2/4
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.25)
    mask = torch.tensor([False, True, True, True])
    # (|0.1 - 1| * 1 + |0.9 - 1| * 2) / 3
    assert expected_calibration_error(probs, labels, 10, mask) == pytest.approx(1.1 / 3)
    calibrated = torch.tensor([0.25] * 4)
    assert expected_calibration_error(calibrated, torch.tensor([1, 0, 0, 0])) == pytest.approx(0)
    # 1.0 falls in the last bin, 0.0 in the first; one bin mixes everything.
    edge = torch.tensor([0.0, 1.0])
    assert expected_calibration_error(edge, torch.tensor([True, True]), 2) == pytest.approx(0.5)
    assert expected_calibration_error(edge, torch.tensor([0, 1]), 1) == pytest.approx(0.0)
    assert expected_calibration_error(edge, torch.tensor([0, 1]), 2, torch.zeros(2).bool()) == 0.0


def test_apply_sts_hand_values():
    logits = torch.tensor([[2.0, -3.0], [0.0, 40.0]])
    out = apply_sts(logits, torch.tensor([2.0, 0.5]))
    assert out[0].tolist() == pytest.approx([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(6.0))])
    assert out[1, 0] == 0.5
    assert 0.0 < out[1, 1] < 1.0  # saturated logit stays strictly inside (0, 1)
    with pytest.raises(ValueError, match="one temperature per position"):
        apply_sts(logits, torch.tensor([1.0, 1.0, 1.0]))


FACTORS = (2.0, 3.0, 0.5)  # over-, over- and under-confident by a known factor per position


def _miscalibrated(n: int, seed: int):
    """Accept flags drawn from true conditional probabilities sigmoid(z); logits reported z * f."""
    g = torch.Generator().manual_seed(seed)
    z = 1.0 + 1.5 * torch.randn(n, len(FACTORS), generator=g)
    accepted = torch.rand(n, len(FACTORS), generator=g) < torch.sigmoid(z)
    return z * torch.tensor(FACTORS), accepted


def test_sts_recovers_the_miscalibration_factor_and_lowers_ece():
    logits, accepted = _miscalibrated(20000, seed=0)
    temps = fit_sts(logits, accepted)
    assert temps.shape == (3,)
    for t, f in zip(temps.tolist(), FACTORS, strict=True):
        assert abs(t - f) / f < 0.15
    before = survival_ece(logits, accepted)
    after = survival_ece(logits, accepted, temps)
    assert all(b > 0.05 for b in before)
    assert all(a < 0.02 for a in after)
    # Held-out data from the same process: still calibrated.
    logits2, accepted2 = _miscalibrated(20000, seed=1)
    assert all(a < 0.02 for a in survival_ece(logits2, accepted2, temps))


def test_sts_with_masked_positions_and_custom_grid():
    logits, accepted = _miscalibrated(20000, seed=2)
    mask = torch.ones_like(accepted)
    mask[::2, 2] = False  # half of the blocks drafted only two positions
    logits[::2, 2] = math.nan
    accepted[::2, 2] = True
    temps = fit_sts(logits, accepted, mask, grid=torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0]))
    assert temps.tolist() == [2.0, 3.0, 0.5]
    assert all(math.isfinite(e) for e in survival_ece(logits, accepted, temps, mask))
    with pytest.raises(ValueError, match="grid"):
        fit_sts(logits, accepted, grid=torch.tensor([0.0, 1.0]))


def test_save_load_roundtrip(tmp_path):
    path = tmp_path / "sts.json"
    save_sts(path, torch.tensor([1.5, 2.0]), ece_before=[0.2, 0.3], ece_after=[0.01, 0.02])
    assert load_sts(path).tolist() == [1.5, 2.0]
    save_sts(path, torch.tensor([0.75]))
    assert load_sts(str(path)).tolist() == [0.75]


@pytest.mark.parametrize(
    "text",
    ["{", "[1.0]", '{"temps": [1.0]}', '{"temperatures": []}', '{"temperatures": [1.0, -2.0]}'],
)
def test_load_bad_file(tmp_path, text):
    path = tmp_path / "bad_sts.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="bad_sts.json"):
        load_sts(path)


def test_calibrate_fits_and_reports_on_every_domain():
    """Sequences arrive domain by domain: the first half miscalibrated by a factor 3, the second
    calibrated. Fitting on one domain and reporting on the other makes the reported ECE worse;
    alternate sequences fit the mixture and lower it."""
    from specserve.train.calibrate import fit_and_report

    gen = torch.Generator().manual_seed(0)
    seqs, blocks, k = 40, 100, 2
    owner = torch.arange(seqs).repeat_interleave(blocks)
    logits = torch.randn(seqs * blocks, k, generator=gen) * 3
    factor = torch.where(owner < seqs // 2, 3.0, 1.0)[:, None]
    true_p = torch.sigmoid(logits / factor)
    accepted = torch.rand(true_p.shape, generator=gen) < true_p
    temps, before, after, fit = fit_and_report(logits, accepted, owner)
    for half in (owner < seqs // 2, owner >= seqs // 2):
        assert fit[half].any() and (~fit[half]).any()
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    assert 1.0 < float(temps[0]) < 3.0
