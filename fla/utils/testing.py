"""Helpers for the test suite: relative-error comparison, NaN poisoning of fresh allocations, interpreter fixes, a
context that fails on host reads of device values (``forbid_host_sync``)."""

from __future__ import annotations

import contextlib
import sys

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the error is reported against a zero reference as ||out||)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, ratio: float, atol: float = 0.0) -> None:
    """Assert that ``out`` matches ``ref`` to relative error ``ratio``; NaN or Inf in either never passes.

    ``atol`` lets a comparison pass when every element differs by at most ``atol`` (for references that are
    all but zero). Shapes must match exactly.
    """
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    for label, t in (("output", out), ("reference", ref)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise AssertionError(f"{name}: {label} holds {bad} NaN/Inf values of {t.numel()}")
    if out.numel() == 0:
        return
    max_abs = (out.detach().double() - ref.detach().double()).abs().max().item()
    if atol > 0 and max_abs <= atol:
        return
    err = relative_error(out, ref)
    if not err <= ratio:
        raise AssertionError(f"{name}: relative error {err:.3e} > {ratio:.1e} (max abs diff {max_abs:.3e})")


def _called_from_fla(depth: int = 2) -> bool:
    frame = sys._getframe(depth)
    module = frame.f_globals.get("__name__", "")
    return module == "fla" or (module.startswith("fla.") and not module.startswith("fla.utils.testing"))


def _poisoned(result: torch.Tensor) -> torch.Tensor:
    if result.is_floating_point() or result.is_complex():
        result.fill_(float("nan"))
    return result


@contextlib.contextmanager
def poison_fresh_allocations():
    """Within the context, floating tensors that code inside ``fla`` gets from ``torch.empty``, ``torch.empty_like``
    or ``Tensor.new_empty`` are filled with NaN, so an output element that a kernel forgot to write shows up as NaN.
    """
    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty)

    def empty(*args, **kwargs):
        out = originals[0](*args, **kwargs)
        return _poisoned(out) if _called_from_fla() else out

    def empty_like(*args, **kwargs):
        out = originals[1](*args, **kwargs)
        return _poisoned(out) if _called_from_fla() else out

    def new_empty(self, *args, **kwargs):
        out = originals[2](self, *args, **kwargs)
        return _poisoned(out) if _called_from_fla() else out

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals


def patch_interpreter_bf16_dot() -> None:
    """Make ``tl.dot`` on bfloat16 operands correct in the Triton CPU interpreter.

    The interpreter stores bf16 as raw uint16 bits and multiplies those bits as integers; widening both operands to
    float32 first gives the product a GPU computes (bf16 inputs, fp32 accumulation). Idempotent.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls.create_dot, "_fla_bf16_patched", False):
        return
    original = builder_cls.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._fla_bf16_patched = True
    builder_cls.create_dot = create_dot


def patch_interpreter_bf16_rounding() -> None:
    """Make float32 -> bfloat16 casts in the Triton CPU interpreter round to nearest even, as GPUs do.

    The interpreter truncates, which is biased and gives about 4x a GPU's bf16 error: kernels that store bf16
    intermediates (e.g. the gated delta rule's WY factors) would fail bf16 tolerances that they meet on the GPU.
    Idempotent.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls.cast_impl, "_fla_bf16_patched", False):
        return
    original = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            return interpreter.TensorHandle(rounded.astype(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._fla_bf16_patched = True
    builder_cls.cast_impl = cast_impl


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
_MASK_INDEX_DTYPES = (torch.bool, torch.uint8)


def _host_sync_error(what: str) -> AssertionError:
    return AssertionError(f"host synchronisation: {what} reads device values on the host (on a GPU the host would "
                          "wait for the device here)")


def _syncing_op(func, args, kwargs) -> bool:
    """Whether the aten op needs device values on the host: to answer (``_local_scalar_dense``, ``equal``) or to size
    its output (``nonzero`` and boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without
    ``output_size``, ``bincount``)."""
    aten = torch.ops.aten
    packet = func.overloadpacket
    if packet in (aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten.is_nonzero,
                  aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.bincount):
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in _MASK_INDEX_DTYPES for i in indices)
    return False


@contextlib.contextmanager
def forbid_host_sync():
    """Within the context, code that reads tensor values on the host raises ``AssertionError``: ``Tensor.item``,
    ``tolist``, ``bool()``, ``int()``, ``float()``, use as an index, and the aten ops that need values on the host
    (``_syncing_op``: boolean-mask indexing, ``nonzero``, ``masked_select``, ``unique``, ...). On CUDA each of them
    stalls the host until the device catches up; this context finds them in CPU tests. (On a GPU,
    ``torch.cuda.set_sync_debug_mode('error')`` also catches explicit device-to-host copies.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if _syncing_op(func, args, kwargs):
                raise _host_sync_error(str(func))
            return func(*args, **kwargs)

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise _host_sync_error(f"Tensor.{name}")
        return read

    saved = {name: torch.Tensor.__dict__.get(name) for name in _HOST_READS}  # None: inherited from TensorBase
    for name in _HOST_READS:
        setattr(torch.Tensor, name, forbidden(name))
    try:
        with NoHostSync():
            yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
