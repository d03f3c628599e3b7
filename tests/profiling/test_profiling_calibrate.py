import json
import math

import pytest
from puzzle.errors import PuzzleError
from puzzle.model.blocks import BlockConfig
from puzzle.profiling.calibrate import Sample, calibrate, fit_factors, load_measured, predict_seconds, with_factors
from puzzle.profiling.hardware import Device, HardwareProfile, Workload, load_profile
from puzzle.shape import ModelShape

SHAPE = ModelShape(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                   intermediate_size=768, num_hidden_layers=4, vocab_size=1000)
# Children of SHAPE: depth and block kinds vary so the compute-, memory- and overhead-bound columns differ.
CHILDREN = {
    "parent": ["attn_g2+ffn_768"] * 4,
    "narrow": ["attn_g4+ffn_256"] * 4,
    "pruned": ["attn_g2+ffn_768", "attn_noop+ffn_512", "attn_linear+ffn_noop", "attn_g8+ffn_linear"],
    "shallow": ["attn_g2+ffn_768"] * 2,
}


def profile(c=1.0, m=1.0, overhead=0.0, input_len=256, step=0.0):
    device = Device("toy cpu", "cpu", {"fp16": 2e11}, 5e10, 1e10, c, m, kernel_overhead_s=overhead,
                    step_overhead_s=step)
    return HardwareProfile("toy", device, Workload(1, input_len, 64, "fp16"))


def samples_from(truth: HardwareProfile) -> list[Sample]:
    out = []
    for name, blocks in CHILDREN.items():
        blocks = tuple(BlockConfig.from_name(b) for b in blocks)
        for phase in ("prefill", "decode"):
            s = Sample(name, blocks, phase, 0.0)
            out.append(Sample(name, blocks, phase, predict_seconds(s, SHAPE, truth)))
    return out


@pytest.mark.parametrize("c, m, overhead, step", [(0.35, 0.6, 3e-6, 0.0), (0.8, 0.25, 0.0, 0.0), (0.5, 0.5, 2e-5, 0.0),
                                                  (0.35, 0.6, 3e-6, 4e-3), (0.8, 0.25, 0.0, 1e-4)])
def test_fit_recovers_known_factors(c, m, overhead, step):
    samples = samples_from(profile(c, m, overhead, step=step))
    fit = fit_factors(samples, SHAPE, profile())  # starts from c = m = 1, no overheads
    assert fit.compute_efficiency == pytest.approx(c, rel=1e-3)
    assert fit.memory_efficiency == pytest.approx(m, rel=1e-3)
    assert fit.kernel_overhead_s == pytest.approx(overhead, rel=1e-3, abs=1e-10)
    assert fit.step_overhead_s == pytest.approx(step, rel=1e-3, abs=1e-10)
    assert fit.rel_rms < 1e-6


def test_groups_timed_at_different_speeds_get_one_factor_each():
    """The same models timed twice, the second time 25% slower (a busier machine): with a group per timing
    run the fit recovers the factors and the runs' relative speed exactly; as one group it cannot."""
    truth = profile(0.35, 0.6, 3e-6, step=4e-3)
    runs = {"fast": 1.0, "slow": 1.25}
    samples = [Sample(s.name, s.blocks, s.phase, s.seconds * speed, group)
               for group, speed in runs.items() for s in samples_from(truth)]
    fit = fit_factors(samples, SHAPE, profile())
    g = dict(fit.group_speed)
    assert g["slow"] / g["fast"] == pytest.approx(1.25, rel=1e-6)
    assert g["slow"] * g["fast"] == pytest.approx(1.0, rel=1e-6)  # geometric mean 1
    scale = 1.25 ** 0.5  # the common speed sits between the two runs
    assert fit.compute_efficiency == pytest.approx(0.35 / scale, rel=1e-3)
    assert fit.memory_efficiency == pytest.approx(0.6 / scale, rel=1e-3)
    assert fit.step_overhead_s == pytest.approx(4e-3 * scale, rel=1e-3)
    assert fit.rel_rms < 1e-6
    ungrouped = fit_factors([Sample(s.name, s.blocks, s.phase, s.seconds) for s in samples], SHAPE, profile())
    assert ungrouped.group_speed == () and ungrouped.rel_rms > 0.05


def test_a_per_step_overhead_bounds_every_childs_speedup():
    """An engine's fixed work per forward pass is the same for every child: with it, the predicted speedup
    of a shallower child shrinks toward 1 (what vLLM's scheduler and sampler do on a small CPU model)."""
    blocks = {n: tuple(BlockConfig.from_name(b) for b in CHILDREN[n]) for n in ("parent", "shallow")}

    def speedup(hw):
        t = {n: predict_seconds(Sample(n, b, "decode", 0.0), SHAPE, hw) for n, b in blocks.items()}
        return t["parent"] / t["shallow"]

    without, with_step = speedup(profile(0.5, 0.5)), speedup(profile(0.5, 0.5, step=1e-3))
    assert without > 1.5 and 1.0 < with_step < without


def test_fit_brings_predictions_in_line():
    truth = profile(0.3, 0.45, 5e-6)
    samples = samples_from(truth)
    start = profile()
    before = max(abs(predict_seconds(s, SHAPE, start) / s.seconds - 1) for s in samples)
    fit = fit_factors(samples, SHAPE, start)
    fitted = with_factors(start, fit.compute_efficiency, fit.memory_efficiency, fit.kernel_overhead_s)
    after = max(abs(predict_seconds(s, SHAPE, fitted) / s.seconds - 1) for s in samples)
    assert before > 0.5 and after < 1e-3


def test_calibrate_writes_a_loadable_profile(tmp_path):
    base = load_profile("cpu_local")
    truth = with_factors(base, 0.4, 0.2, 2e-6, 3e-4)
    samples = samples_from(truth)
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({
        "shape": SHAPE.__dict__,
        "samples": [{"name": s.name, "blocks": [b.name for b in s.blocks], "phase": s.phase, "seconds": s.seconds}
                    for s in samples],
    }))
    out, fit = calibrate(measured, "cpu_local")
    assert out == tmp_path / "cpu_local.calibrated.yaml"
    written = load_profile(out)
    assert written.device.compute_efficiency == pytest.approx(0.4, rel=1e-3)
    assert written.device.memory_efficiency == pytest.approx(0.2, rel=1e-3)
    assert written.device.kernel_overhead_s == pytest.approx(2e-6, rel=1e-3)
    assert written.device.step_overhead_s == pytest.approx(3e-4, rel=1e-3)
    assert written.workload == base.workload
    assert "calibrate" in out.read_text().splitlines()[0]


def test_calibrate_records_its_error_for_solve_margin(tmp_path):
    """Timings the model cannot fit exactly (each off by up to 6%): the fit's relative RMS is written as
    device.calibration_error, which `solve --margin calibrated` reads."""
    samples = samples_from(with_factors(load_profile("cpu_local"), 0.4, 0.2, 2e-6, 3e-4))
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({
        "shape": SHAPE.__dict__,
        "samples": [{"name": s.name, "blocks": [b.name for b in s.blocks], "phase": s.phase,
                     "seconds": s.seconds * (1 + 0.06 * math.sin(2.3 * i))} for i, s in enumerate(samples)],
    }))
    out, fit = calibrate(measured, "cpu_local")
    error = load_profile(out).device.calibration_error
    assert 0.005 < fit.rel_rms < 0.06 and error == round(fit.rel_rms, 4)
    assert load_profile("cpu_local").device.calibration_error == 0  # never calibrated: nothing recorded


def test_too_few_timings_is_a_user_error():
    samples = samples_from(profile())[:3]
    with pytest.raises(PuzzleError, match="at least 4"):
        fit_factors(samples, SHAPE, profile())


def test_bad_measured_file_is_a_user_error(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"shape": SHAPE.__dict__, "samples": [{"blocks": [], "phase": "train", "seconds": 1}]}))
    with pytest.raises(PuzzleError, match="phase"):
        load_measured(bad)


def test_llamacpp_profile_uses_the_roofline_and_refuses_measure():
    from puzzle.profiling.commands import _should_measure

    hw = load_profile("cpu_llamacpp")
    assert hw.device.engine == "llamacpp"
    assert _should_measure(hw, None) is None
    with pytest.raises(PuzzleError, match="calibrate"):
        _should_measure(hw, True)
