"""``L2Norm``: the module form of ``fla.ops.utils.l2norm.l2norm`` (x / sqrt(sum(x^2) + eps) over the last dim)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from fla.ops.utils.l2norm import l2norm
from fla.utils import FLOAT_DTYPES, check_non_negative_float


class L2Norm(nn.Module):
    """L2-normalise the last dimension: ``forward(x) = x / sqrt(sum(x^2, -1) + eps)``, in ``output_dtype`` or x's dtype.

    No parameters. x: [..., D] float32 / float16 / bfloat16.
    """

    def __init__(self, eps: float = 1e-6, output_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.eps = check_non_negative_float("eps", eps)
        if output_dtype is not None and output_dtype not in FLOAT_DTYPES:
            raise ValueError(f"output_dtype={output_dtype!r} is not allowed; "
                             "choose None, torch.float32, torch.float16 or torch.bfloat16")
        self.output_dtype = output_dtype

    def extra_repr(self) -> str:
        return f"eps={self.eps}" + (f", output_dtype={self.output_dtype}" if self.output_dtype is not None else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2norm(x, self.eps, self.output_dtype)
