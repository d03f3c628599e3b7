"""Hardware profiles, the roofline cost model, measured latency and `puzzle profile`."""

from .hardware import Device, HardwareProfile, Workload, load_profile, shipped_profiles
from .roofline import ModelShape, combine_costs, parent_blocks, predict_model_costs, sublayer_costs

__all__ = [
    "Device",
    "HardwareProfile",
    "ModelShape",
    "Workload",
    "combine_costs",
    "load_profile",
    "parent_blocks",
    "predict_model_costs",
    "shipped_profiles",
    "sublayer_costs",
]
