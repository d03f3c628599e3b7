import pytest
import yaml

from puzzle.errors import PuzzleError
from puzzle.profiling.hardware import load_profile, parse_profile, shipped_profiles


def raw_profile(**changes):
    raw = {
        "name": "toy",
        "device": {
            "name": "toy gpu",
            "kind": "gpu",
            "peak_flops": {"bf16": 100.0},
            "memory_bandwidth": 50.0,
            "memory_bytes": 1000.0,
            "efficiency": {"compute": 0.5, "memory": 0.8},
        },
        "workload": {"batch_size": 2, "input_len": 8, "output_len": 4, "dtype": "bf16"},
        "constraints": {"speedup": 1.5},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    return raw


def test_every_shipped_profile_loads_with_its_figures():
    assert set(shipped_profiles()) >= {"h100_80gb", "h200_141gb", "a100_80gb", "l40s_48gb", "cpu_local"}
    for name in shipped_profiles():
        hw = load_profile(name)
        assert hw.name == name
        assert hw.device.flops_per_s(hw.workload.dtype) > 0
        assert hw.device.bytes_per_s > 0
        assert hw.constraints["speedup"] > 1
    h100 = load_profile("h100_80gb")
    assert h100.device.peak_flops["bf16"] == pytest.approx(989.4e12)
    assert h100.device.peak_flops["fp8"] == pytest.approx(2 * 989.4e12, rel=1e-3)
    assert h100.device.memory_bandwidth == pytest.approx(3.35e12)
    assert "fp8" not in load_profile("a100_80gb").device.peak_flops  # Ampere has no FP8


def test_achievable_rates_apply_the_efficiency_factors():
    hw = parse_profile(raw_profile())
    assert hw.device.flops_per_s("bf16") == pytest.approx(50.0)
    assert hw.device.bytes_per_s == pytest.approx(40.0)
    assert hw.workload.decode_context == 8 + 2
    assert hw.workload.max_context == 12


def test_a_path_loads_and_numbers_written_as_yaml_strings_are_accepted(tmp_path):
    raw = raw_profile(device__memory_bandwidth="1e12")  # YAML 1.1 reads 1e12 as a string
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    hw = load_profile(path)
    assert hw.device.memory_bandwidth == 1e12


def test_unknown_name_lists_the_shipped_profiles():
    with pytest.raises(PuzzleError, match="unknown hardware profile 'h900'.*h100_80gb"):
        load_profile("h900")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"workload__dtype": "fp8"}, "no peak"),
        ({"workload__dtype": "int3"}, "dtype must be one of"),
        ({"workload__batch_size": 0}, "batch_size must be positive"),
        ({"workload__input_len": 2.5}, "must be an integer"),
        ({"device__efficiency": {"compute": 1.5}}, r"must be in \(0, 1\]"),
        ({"device__memory_bandwidth": "fast"}, "must be a number"),
        ({"device__kind": "tpu"}, "'gpu' or 'cpu'"),
        ({"device__peak_flops": {"bf17": 1.0}}, "unknown keys"),
        ({"constraints": {"max_memory_bytes": 2}}, "unknown keys"),
        ({"constraints": {"speedup": -1}}, "must be positive"),
        # every number finite (issue 22: memory_bandwidth .inf predicted 316M tok/s)
        ({"device__memory_bandwidth": float("inf")}, "memory_bandwidth must be a finite number"),
        ({"device__memory_bandwidth": "inf"}, "memory_bandwidth must be a finite number"),
        ({"device__peak_flops": {"bf16": float("inf")}}, "peak_flops.bf16 must be a finite number"),
        ({"device__memory_bytes": float("nan")}, "memory_bytes must be a finite number"),
        ({"device__kernel_overhead_s": float("nan")}, "kernel_overhead_s must be a finite number"),
        ({"device__efficiency": {"memory": float("nan")}}, "efficiency.memory must be a finite number"),
        ({"device__threads": float("inf")}, "threads must be a finite number"),
        ({"workload__output_len": float("inf")}, "output_len must be a finite number"),
        ({"constraints": {"latency_ms": float("inf")}}, "latency_ms must be a finite number"),
        ({"constraints": {"max_params": "1e999"}}, "not a finite count"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_bad_profiles_fail_with_one_clear_line(changes, message):
    with pytest.raises(PuzzleError, match=message):
        parse_profile(raw_profile(**changes))


def test_constraints_use_the_solvers_names_and_read_parameter_counts():
    hw = parse_profile(raw_profile(constraints={"speedup": 2, "memory_gib": "40", "latency_ms": 900, "max_params": "80M"}))
    assert hw.constraints == {"speedup": 2.0, "memory_gib": 40.0, "latency_ms": 900.0, "max_params": 80e6}
    problem = pytest.importorskip("puzzle.solver.problem")  # what `puzzle solve` builds from them
    assert problem.Constraints(**hw.constraints).max_params == 80e6


def test_with_workload_changes_one_field_and_validates():
    hw = load_profile("h100_80gb")
    assert hw.with_workload(batch_size=32).workload.batch_size == 32
    assert hw.workload.batch_size == 64  # the original is unchanged (frozen)
    with pytest.raises(PuzzleError):
        hw.with_workload(batch_size=-1)


@pytest.mark.parametrize("profile, gpu, same", [
    ("h100_80gb", "NVIDIA H100 80GB HBM3", True),
    ("h100_80gb", "NVIDIA H100 PCIe", True),
    ("h100_80gb", "NVIDIA H200", False),
    ("h200_141gb", "NVIDIA H200", True),
    ("a100_80gb", "NVIDIA A100-SXM4-80GB", True),
    ("a100_80gb", "NVIDIA A10", False),
    ("l40s_48gb", "NVIDIA L40S", True),
    ("l40s_48gb", "NVIDIA L40", False),
    ("cpu_local", "AMD EPYC 9B45", True),  # a CPU profile describes whatever CPU it runs on
])
def test_a_profile_knows_which_devices_are_its_own(profile, gpu, same):
    assert load_profile(profile).device.matches(gpu) is same
