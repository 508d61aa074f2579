"""fla: hybrid linear / sparse attention language models.

Gated DeltaNet, sliding-window attention, Native Sparse Attention and Learnable Token Eviction, each with a float32
torch reference, a torch path fast enough for the CPU, and a Triton path for CUDA.

Importing ``fla`` is cheap: it compiles no kernel, probes no device and reads no environment variable. Its only side
effect, once model families exist, is registering them with transformers' Auto classes.
"""

__version__ = "0.1.0"

# Registers every model family with transformers' AutoConfig / AutoModel / AutoModelForCausalLM (flame and
# `AutoConfig.from_pretrained` rely on this). Kernel modules are imported by the layers on first use, not here.
from fla import models  # noqa: E402,F401

__all__ = ["__version__"]
