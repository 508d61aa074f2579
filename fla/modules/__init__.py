"""Reusable nn.Modules, each with a torch path and (where it pays on GPU) a Triton path, forward and backward."""

from fla.modules.fused_norm_gate import FusedRMSNormGated
from fla.modules.layernorm import RMSNorm, rms_norm

__all__ = ["FusedRMSNormGated", "RMSNorm", "rms_norm"]
