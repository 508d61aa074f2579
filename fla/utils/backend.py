"""Choice between the torch and the Triton implementation of an op.

The rule: CUDA tensors take the Triton path, everything else the torch path. One environment variable overrides it,
read at call time (never at import):

    FLA_BACKEND=auto    (default) Triton on CUDA, torch elsewhere
    FLA_BACKEND=torch   always the torch path (e.g. to compare against the kernels on a GPU)
    FLA_BACKEND=triton  always the Triton path; on CPU tensors this needs TRITON_INTERPRET=1 set before ``fla``
                        is imported (the Triton interpreter; slow, meant for tests of the kernels' logic)
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "FLA_BACKEND"


def requested_backend() -> str:
    """The value of ``FLA_BACKEND`` ('auto' when unset), validated."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    return value


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` (its first tensor input) should run its Triton path: on CUDA unless
    ``FLA_BACKEND=torch``, elsewhere only when ``FLA_BACKEND=triton``.

    Raises ``ValueError`` when ``FLA_BACKEND=triton`` is asked for a CPU tensor without the Triton interpreter.
    """
    choice = requested_backend()
    if choice == "torch":
        return False
    if choice == "triton":
        if x.device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"{ENV_VAR}=triton was asked for a tensor on {x.device}, but Triton kernels need CUDA tensors or "
                "TRITON_INTERPRET=1 set before fla is imported; unset FLA_BACKEND to use the torch path"
            )
        return True
    return x.device.type == "cuda"
