"""Reusable nn.Modules, each with a torch path and (where it pays on GPU) a Triton path, forward and backward.

The tensor-parallel styles (``fla.modules.parallel.PrepareModuleWeight``, ``fla.modules.mlp.SwiGLULinearParallel``,
``fla.modules.fused_linear_cross_entropy.LinearLossParallel``) are imported from their own modules, so that
``import fla.modules`` does not import ``torch.distributed``.
"""

from fla.modules.activations import swiglu, swiglu_linear
from fla.modules.convolution import ShortConvolution, causal_conv1d, causal_conv1d_update
from fla.modules.fused_cross_entropy import FusedCrossEntropyLoss, cross_entropy_loss
from fla.modules.fused_linear_cross_entropy import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy_loss
from fla.modules.fused_norm_gate import FusedRMSNormGated
from fla.modules.l2norm import L2Norm
from fla.modules.layernorm import RMSNorm, rms_norm
from fla.modules.mlp import GatedMLP
from fla.modules.rotary import RotaryEmbedding, apply_rotary, rotary_inv_freq

__all__ = [
    "FusedCrossEntropyLoss",
    "FusedLinearCrossEntropyLoss",
    "FusedRMSNormGated",
    "GatedMLP",
    "L2Norm",
    "RMSNorm",
    "RotaryEmbedding",
    "ShortConvolution",
    "apply_rotary",
    "causal_conv1d",
    "causal_conv1d_update",
    "cross_entropy_loss",
    "fused_linear_cross_entropy_loss",
    "rms_norm",
    "rotary_inv_freq",
    "swiglu",
    "swiglu_linear",
]
