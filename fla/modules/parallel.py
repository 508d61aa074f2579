"""Tensor-parallel styles (``torch.distributed.tensor.parallel.ParallelStyle``) used by flame's TP plans.

- ``PrepareModuleWeight(layouts=Replicate())``: turns a module's parameters into DTensors with the given placement
  (no communication), so a fused op that needs the whole weight (e.g. the fused linear cross-entropy on
  ``lm_head``) sees it as a DTensor like the rest of a TP model.
- ``SwiGLULinearParallel``: row-wise tensor parallelism for ``GatedMLP.swiglu_linear``. gate / up arrive sharded on
  their last dimension (the output of column-parallel ``gate_proj`` / ``up_proj``), ``down_proj.weight`` is sharded
  on its input dimension (row-parallel), each rank computes a partial sum, and the output is reduced to
  ``output_layouts`` (all-reduce for Replicate, reduce-scatter for Shard).

Apply them with ``torch.distributed.tensor.parallel.parallelize_module(model, mesh, plan)``. Constructing them needs
no process group; on a torch built without distributed support they raise when constructed.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

try:
    from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle
except ImportError:  # torch without distributed support (some macOS / Windows builds)
    DTensor = Partial = Placement = Replicate = Shard = distribute_module = None
    ParallelStyle = object

from fla.modules.activations import swiglu_linear


def _require_distributed(what: str) -> None:
    if DTensor is None:
        raise RuntimeError(f"{what} needs torch.distributed (this torch build has no distributed support)")


def _placements(name: str, layouts, mesh_ndim: Optional[int] = None) -> tuple:
    placements = (layouts,) if isinstance(layouts, Placement) else tuple(layouts)
    if not placements or not all(isinstance(p, Placement) for p in placements):
        raise ValueError(
            f"{name} must be a Placement (e.g. Replicate(), Shard(0)) or a sequence of them, got {layouts!r}"
        )
    if mesh_ndim is not None and len(placements) != mesh_ndim:
        raise ValueError(f"{name}={placements} gives {len(placements)} placements for a {mesh_ndim}-D device mesh")
    return placements


class PrepareModuleWeight(ParallelStyle):
    """Wrap every parameter of a module (and of its submodules) as a DTensor with placements ``layouts``.

    No data moves: each rank's current parameter becomes its local part (``DTensor.from_local``). So replicated
    parameters must already be equal on all ranks (same seed or loaded checkpoint), and sharded ones must already be
    the local slices. Parameters that are DTensors already are left alone; ``requires_grad`` is kept.

    Args:
        layouts: a ``Placement`` for a 1-D mesh, or one placement per mesh dimension; default ``Replicate()``.
    """

    def __init__(self, *, layouts: Union[Placement, Sequence[Placement], None] = None):
        _require_distributed("PrepareModuleWeight")
        super().__init__()
        self.layouts = Replicate() if layouts is None else layouts
        _placements("layouts", self.layouts)

    def _partition_fn(self, name: str, module: nn.Module, device_mesh) -> None:
        placements = _placements("layouts", self.layouts, device_mesh.ndim)
        # distribute_module calls this once per submodule: only the module's own parameters here
        for p_name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                continue
            dparam = DTensor.from_local(param.data, device_mesh, placements, run_check=False)
            module.register_parameter(p_name, nn.Parameter(dparam, requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, partition_fn=self._partition_fn)


def _normalized(placements: tuple, ndim: int) -> tuple:
    """Placements with negative shard dims made non-negative (DTensor stores them that way)."""
    return tuple(Shard(p.dim % ndim) if isinstance(p, Shard) else p for p in placements)


def _as_dtensor(t: torch.Tensor, mesh, placements: tuple, desired: tuple):
    """``t`` as a DTensor with placements ``desired``; a plain tensor is taken to be laid out as ``placements``."""
    if not isinstance(t, DTensor):
        t = DTensor.from_local(t, mesh, placements, run_check=False)
    if t.placements != desired:
        t = t.redistribute(placements=desired)
    return t


def sharded_swiglu_linear(gate, up, weight, bias=None):
    """``swiglu_linear`` on DTensors over a 1-D mesh: gate / up sharded on their last dim, weight on dim 1.

    Inputs in other layouts are redistributed first. Each rank runs the local fused op; the result is a DTensor
    with a ``Partial`` (sum) placement, plus ``bias`` (replicated) when given.
    """
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"sharded swiglu_linear needs a 1-D device mesh, got a {mesh.ndim}-D one")
    if not isinstance(gate, DTensor) or not isinstance(up, DTensor):
        raise ValueError("with a DTensor weight, gate and up must be DTensors too (apply SwiGLULinearParallel)")
    feature_shard = (Shard(gate.ndim - 1),)
    gate = _as_dtensor(gate, mesh, feature_shard, feature_shard)
    up = _as_dtensor(up, mesh, feature_shard, feature_shard)
    weight = _as_dtensor(weight, mesh, (Shard(1),), (Shard(1),))
    out = swiglu_linear(gate.to_local(), up.to_local(), weight.to_local(), None)
    out = DTensor.from_local(out, mesh, (Partial(),), run_check=False)
    if bias is not None:
        out = out + _as_dtensor(bias, mesh, (Replicate(),), (Replicate(),))
    return out


class SwiGLULinearParallel(ParallelStyle):
    """Tensor parallelism for ``SwiGLULinear`` (``GatedMLP.swiglu_linear``), called as ``(gate, up, weight, bias)``.

    Keyword Args:
        input_layouts: the layout of plain-tensor gate / up inputs; default ``Shard(-1)`` (column-parallel
            ``gate_proj`` / ``up_proj`` outputs). They are redistributed to ``Shard(-1)`` when different.
        output_layouts: the layout of the output; default ``Replicate()`` (all-reduce). flame uses ``Shard(1)``
            (sequence parallel: reduce-scatter).
        use_local_output: return the local ``torch.Tensor`` instead of the DTensor; default True.

    A plain-tensor ``weight`` is taken to be the local shard of a weight sharded on dim 1 (``down_proj`` under
    ``RowwiseParallel`` is already such a DTensor), a plain ``bias`` to be replicated.
    """

    def __init__(self, *, input_layouts: Optional[Placement] = None, output_layouts: Optional[Placement] = None,
                 use_local_output: bool = True):
        _require_distributed("SwiGLULinearParallel")
        super().__init__()
        self.input_layouts = _placements("input_layouts", input_layouts or Shard(-1))
        self.output_layouts = _placements("output_layouts", output_layouts or Replicate())
        self.use_local_output = use_local_output

    @staticmethod
    def _prepare_input_fn(input_layouts, mod, inputs, device_mesh):
        if len(inputs) not in (3, 4):
            raise ValueError(
                f"SwiGLULinearParallel expects the module to be called as (gate, up, weight[, bias]) positionally, "
                f"got {len(inputs)} positional arguments"
            )
        gate, up, weight = inputs[:3]
        bias = inputs[3] if len(inputs) == 4 else None
        shard_last = (Shard(gate.ndim - 1),)
        given = _normalized(input_layouts, gate.ndim)
        gate = _as_dtensor(gate, device_mesh, given, shard_last)
        up = _as_dtensor(up, device_mesh, given, shard_last)
        weight = _as_dtensor(weight, device_mesh, (Shard(1),), (Shard(1),))
        if bias is not None:
            bias = _as_dtensor(bias, device_mesh, (Replicate(),), (Replicate(),))
        return gate, up, weight, bias

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        output_layouts = _normalized(output_layouts, outputs.ndim)
        if outputs.placements != output_layouts:
            outputs = outputs.redistribute(placements=output_layouts)
        return outputs.to_local() if use_local_output else outputs

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if device_mesh.ndim != 1:
            raise ValueError(f"SwiGLULinearParallel needs a 1-D device mesh, got a {device_mesh.ndim}-D one")
        return distribute_module(
            module,
            device_mesh,
            partition_fn=None,
            input_fn=partial(self._prepare_input_fn, self.input_layouts),
            output_fn=partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )
