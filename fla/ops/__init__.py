"""Pure tensor functions (no nn.Module, no config): the kernels and their torch references."""
