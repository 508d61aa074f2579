"""swiglu, swiglu_linear and GatedMLP on both backends against float64 references; the tensor-parallel styles."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fla.modules.activations import swiglu, swiglu_linear
from fla.modules.mlp import GatedMLP, SwiGLULinear, default_intermediate_size
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def swiglu_reference(gate, up):
    return F.silu(gate.double()) * up.double()


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


SWIGLU_CASES = [  # (shape, dtype); 1024 elements per Triton program, so 2 x 1500 spans three programs
    ((3, 7, 33), torch.float32),
    ((1, 1001), torch.float32),
    ((2, 1500), torch.float32),
    ((3, 7, 33), torch.bfloat16),
    ((1, 1001), torch.bfloat16),
    ((4, 2, 3, 5), torch.float16),
]


@pytest.mark.parametrize("shape,dtype", SWIGLU_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in SWIGLU_CASES])
def test_swiglu_matches_reference(backend, device, shape, dtype):
    gate = (2 * torch.randn(shape, device=device)).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    g1, u1 = leaves(gate, up)
    y = swiglu(g1, u1)
    dy = torch.randn_like(y)
    y.backward(dy)
    g2, u2 = leaves(gate.double(), up.double())
    y_ref = swiglu_reference(g2, u2)
    y_ref.backward(dy.double())

    assert y.dtype == dtype and y.shape == gate.shape
    tol = TOL[dtype]
    assert_close("y", y, y_ref, tol)
    assert_close("dgate", g1.grad, g2.grad, tol)
    assert_close("dup", u1.grad, u2.grad, tol)
    assert g1.grad.dtype == dtype and u1.grad.dtype == dtype


def test_swiglu_non_contiguous_and_empty(backend, device):
    g1 = torch.randn(33, 7, device=device, requires_grad=True)
    u1 = torch.randn(7, 33, device=device, requires_grad=True)
    y = swiglu(g1.t(), u1)  # a transposed (non-contiguous) gate
    dy = torch.randn_like(y)
    y.backward(dy)
    g2, u2 = leaves(g1.double(), u1.double())
    y_ref = swiglu_reference(g2.t(), u2)
    y_ref.backward(dy.double())
    assert_close("y", y, y_ref, 1e-5)
    assert_close("dgate", g1.grad, g2.grad, 1e-5)
    assert_close("dup", u1.grad, u2.grad, 1e-5)
    empty = torch.randn(0, 5, device=device)
    assert swiglu(empty, empty).shape == (0, 5)


SWIGLU_LINEAR_CASES = [  # (gate shape, out_features, dtype, bias)
    ((2, 9, 40), 24, torch.float32, True),
    ((37, 65), 17, torch.float32, False),
    ((2, 9, 40), 24, torch.bfloat16, True),
]


@pytest.mark.parametrize("shape,out_features,dtype,has_bias", SWIGLU_LINEAR_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-o{c[1]}-{str(c[2])[6:]}-b{int(c[3])}"
                              for c in SWIGLU_LINEAR_CASES])
def test_swiglu_linear_matches_reference(backend, device, shape, out_features, dtype, has_bias):
    in_features = shape[-1]
    gate = (2 * torch.randn(shape, device=device)).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    weight = (torch.randn(out_features, in_features, device=device) / in_features ** 0.5).to(dtype)
    bias = torch.randn(out_features, device=device).to(dtype) if has_bias else None

    g1, u1, w1, b1 = leaves(gate, up, weight, bias)
    out = swiglu_linear(g1, u1, w1, b1)
    dout = torch.randn_like(out)
    out.backward(dout)
    g2, u2, w2, b2 = leaves(*(t.double() if t is not None else None for t in (gate, up, weight, bias)))
    out_ref = F.linear(swiglu_reference(g2, u2), w2, b2)
    out_ref.backward(dout.double())

    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (*shape[:-1], out_features)
    assert_close("out", out, out_ref, tol)
    assert_close("dgate", g1.grad, g2.grad, tol)
    assert_close("dup", u1.grad, u2.grad, tol)
    assert_close("dweight", w1.grad, w2.grad, tol)
    if has_bias:
        assert_close("dbias", b1.grad, b2.grad, tol)


def test_swiglu_linear_saves_inputs_not_the_activation(backend, device):
    gate, up = torch.randn(2, 6, 50, device=device), torch.randn(2, 6, 50, device=device)
    weight = torch.randn(8, 50, device=device)
    g1, u1, w1 = leaves(gate, up, weight)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = swiglu_linear(g1, u1, w1)
    assert sorted(saved) == sorted([gate.numel(), up.numel(), weight.numel()])
    out.sum().backward()  # and the backward works with only those


def test_swiglu_linear_only_some_grads(backend, device):
    gate, up = torch.randn(3, 20, device=device), torch.randn(3, 20, device=device)
    weight = torch.randn(6, 20, device=device, requires_grad=True)
    swiglu_linear(gate, up, weight).sum().backward()
    assert_close("dweight", weight.grad, torch.ones(3, 6, dtype=torch.float64, device=device).t() @ swiglu_reference(gate, up), 1e-5)
    g1 = gate.clone().requires_grad_(True)
    swiglu_linear(g1, up, weight.detach()).sum().backward()
    assert g1.grad is not None and torch.isfinite(g1.grad).all()


def test_swiglu_linear_under_autocast(backend, device):
    """float32 weights with bfloat16 activations under autocast (flame's single-device AMP path)."""
    gate = torch.randn(2, 5, 32, device=device).bfloat16()
    up = torch.randn(2, 5, 32, device=device).bfloat16()
    weight, bias = torch.randn(12, 32, device=device) / 6, torch.randn(12, device=device)
    g1, u1, w1, b1 = leaves(gate, up, weight, bias)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = swiglu_linear(g1, u1, w1, b1)
    assert out.dtype == torch.bfloat16
    dout = torch.randn_like(out)
    out.backward(dout)
    assert w1.grad.dtype == torch.float32 and b1.grad.dtype == torch.float32 and g1.grad.dtype == torch.bfloat16
    g2, u2, w2, b2 = leaves(gate.double(), up.double(), weight.double(), bias.double())
    out_ref = F.linear(swiglu_reference(g2, u2), w2, b2)
    out_ref.backward(dout.double())
    for name, a, b in (("out", out, out_ref), ("dgate", g1.grad, g2.grad), ("dup", u1.grad, u2.grad),
                       ("dweight", w1.grad, w2.grad), ("dbias", b1.grad, b2.grad)):
        assert_close(name, a, b, 2e-2)


def mlp_reference(mlp, x):
    """float64 SwiGLU MLP with the module's weights; returns (out, leaf params in order gate, up, down)."""
    ws = [p.detach().double().requires_grad_(True) for p in
          (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    out = F.linear(swiglu_reference(F.linear(x, ws[0]), F.linear(x, ws[1])), ws[2])
    return out, ws


@pytest.mark.parametrize("dtype,intermediate_size", [(torch.float32, 100), (torch.float32, None),
                                                      (torch.bfloat16, 72)])
def test_gated_mlp_fused_unfused_and_reference(backend, device, dtype, intermediate_size):
    H = 48
    fused = GatedMLP(H, intermediate_size=intermediate_size, fuse_swiglu=True).to(device, dtype)
    unfused = GatedMLP(H, intermediate_size=intermediate_size, fuse_swiglu=False).to(device, dtype)
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, H, device=device).to(dtype)
    dout = torch.randn(2, 7, H, device=device).to(dtype)

    results = {}
    for name, mlp in (("fused", fused), ("unfused", unfused)):
        x1 = x.clone().requires_grad_(True)
        out = mlp(x1, position_ids=None)  # extra kwargs are ignored, as in FLA
        out.backward(dout)
        results[name] = [out, x1.grad] + [p.grad for p in (mlp.gate_proj.weight, mlp.up_proj.weight,
                                                            mlp.down_proj.weight)]
    x2 = x.double().requires_grad_(True)
    out_ref, ws = mlp_reference(fused, x2)
    out_ref.backward(dout.double())
    reference = [out_ref, x2.grad] + [w.grad for w in ws]

    names = ["out", "dx", "dgate_proj", "dup_proj", "ddown_proj"]
    tol = TOL[dtype]
    for name, a, b, r in zip(names, results["fused"], results["unfused"], reference):
        assert a.dtype == dtype
        assert_close(f"{name} fused vs reference", a, r, tol)
        assert_close(f"{name} unfused vs reference", b, r, tol)
        assert_close(f"{name} fused vs unfused", a, b, tol)


def test_intermediate_size_rule_and_state_dict():
    assert default_intermediate_size(1024) == 2816
    assert default_intermediate_size(2048) == 5632
    mlp = GatedMLP(1024, device="meta")
    assert mlp.intermediate_size == 2816 and mlp.hidden_ratio == 4
    assert GatedMLP(2048, device="meta").intermediate_size == 5632
    assert GatedMLP(64, hidden_ratio=2).intermediate_size == 256  # int(85.33) -> 85 -> 256
    assert GatedMLP(64, hidden_ratio=4, intermediate_size=100).intermediate_size == 100
    shapes = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    assert shapes == {"gate_proj.weight": (2816, 1024), "up_proj.weight": (2816, 1024),
                      "down_proj.weight": (1024, 2816)}
    unfused = GatedMLP(1024, fuse_swiglu=False, device="meta")
    assert shapes == {k: tuple(v.shape) for k, v in unfused.state_dict().items()}


def test_bad_inputs_raise_clear_errors(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match=r"up must have shape \[2, 8\], got \[2, 7\]"):
        swiglu(x, torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="gate has dtype int64"):
        swiglu(torch.ones(2, 8, dtype=torch.long, device=device), x)
    with pytest.raises(ValueError, match="up has dtype bfloat16"):
        swiglu(x, x.bfloat16())
    with pytest.raises(ValueError, match="up must be a torch.Tensor"):
        swiglu(x, 1.0)
    with pytest.raises(ValueError, match=r"weight must have shape \[out_features, 8\]"):
        swiglu_linear(x, x, torch.randn(4, 9, device=device))
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        swiglu_linear(x, x, torch.randn(8, device=device))
    with pytest.raises(ValueError, match=r"bias must have shape \[4\]"):
        swiglu_linear(x, x, torch.randn(4, 8, device=device), torch.randn(5, device=device))
    with pytest.raises(ValueError, match="weight has dtype bfloat16 but gate has float32"):
        swiglu_linear(x, x, torch.randn(4, 8, device=device).bfloat16())
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        GatedMLP(16, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_size must be an integer >= 1, got 0"):
        GatedMLP(0)
    with pytest.raises(ValueError, match="hidden_ratio must be a number > 0, got -1"):
        GatedMLP(16, hidden_ratio=-1)
    with pytest.raises(ValueError, match="intermediate_size must be an integer >= 1, got 0"):
        GatedMLP(16, intermediate_size=0)
    with pytest.raises(ValueError, match="fuse_swiglu='yes'"):
        GatedMLP(16, fuse_swiglu="yes")
    with pytest.raises(ValueError, match="expected hidden_size=16"):
        GatedMLP(16, intermediate_size=32).to(device)(torch.randn(2, 15, device=device))
    assert GatedMLP(16, hidden_act="silu").hidden_act == "silu"


# ---------------------------------------------------------------- tensor parallel


def test_parallel_styles_construct_without_a_process_group():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ParallelStyle

    from fla.modules.mlp import SwiGLULinearParallel
    from fla.modules.parallel import PrepareModuleWeight, SwiGLULinearParallel as same

    assert SwiGLULinearParallel is same
    assert isinstance(PrepareModuleWeight(), ParallelStyle)
    assert PrepareModuleWeight().layouts == Replicate()
    assert PrepareModuleWeight(layouts=Shard(0)).layouts == Shard(0)
    style = SwiGLULinearParallel(output_layouts=Shard(1))
    assert style.output_layouts == (Shard(1),) and style.input_layouts == (Shard(-1),) and style.use_local_output
    with pytest.raises(ValueError, match="layouts must be a Placement"):
        PrepareModuleWeight(layouts="replicate")
    with pytest.raises(ImportError):
        from fla.modules.mlp import NoSuchThing  # noqa: F401


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A 1-process gloo process group and 1-D CPU device mesh (exercises the DTensor code paths)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        pytest.skip("torch built without distributed support")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_prepare_module_weight(one_rank_mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from fla.modules.parallel import PrepareModuleWeight

    model = nn.Sequential(nn.Linear(6, 4), nn.Sequential(nn.Linear(4, 3, bias=False)))
    model[0].bias.requires_grad_(False)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    parallelize_module(model, one_rank_mesh, {"0": PrepareModuleWeight(layouts=Replicate()),
                                              "1": PrepareModuleWeight(layouts=Shard(0))})
    params = dict(model.named_parameters())
    assert set(params) == set(before)
    for name, p in params.items():
        assert isinstance(p, DTensor) and isinstance(p, nn.Parameter)
        assert p.placements == ((Shard(0),) if name.startswith("1.") else (Replicate(),))
        assert torch.equal(p.full_tensor(), before[name])
    assert not params["0.bias"].requires_grad and params["0.weight"].requires_grad

    with pytest.raises(ValueError, match="2 placements for a 1-D device mesh"):
        parallelize_module(nn.Linear(2, 2), one_rank_mesh, PrepareModuleWeight(layouts=[Replicate(), Replicate()]))


def test_swiglu_linear_parallel_in_a_tp_plan(backend, one_rank_mesh):
    """flame's MLP plan on a 1-rank mesh gives the unsharded module's output and gradients."""
    from fla.utils import triton_interpreting

    if backend == "triton" and not triton_interpreting():
        pytest.skip("the 1-rank gloo mesh holds CPU tensors: the Triton path runs on them only in the interpreter (CPU CI)")
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    from fla.modules.mlp import SwiGLULinearParallel

    plain = GatedMLP(32, intermediate_size=40)
    tp = GatedMLP(32, intermediate_size=40)
    tp.load_state_dict(plain.state_dict())
    parallelize_module(tp, one_rank_mesh, {
        "": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "gate_proj": ColwiseParallel(),
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=Shard(1)),
        "swiglu_linear": SwiGLULinearParallel(output_layouts=Shard(1)),
    })
    assert isinstance(tp.down_proj.weight, DTensor)
    x = torch.randn(2, 5, 32)
    dout = torch.randn(2, 5, 32)
    x1, x2 = leaves(x, x)
    out = tp(x1)
    assert not isinstance(out, DTensor)
    out.backward(dout)
    out_ref = plain(x2)
    out_ref.backward(dout)
    assert_close("out", out, out_ref, 1e-5)
    assert_close("dx", x1.grad, x2.grad, 1e-5)
    for name in ("gate_proj", "up_proj", "down_proj"):
        grad = getattr(tp, name).weight.grad
        assert_close(f"d{name}", grad.full_tensor(), getattr(plain, name).weight.grad, 1e-5)

    # the style on its own, with a bias and plain-tensor (local) inputs
    module = SwiGLULinear()
    parallelize_module(module, one_rank_mesh, SwiGLULinearParallel())
    gate, up, weight, bias = torch.randn(3, 16), torch.randn(3, 16), torch.randn(4, 16), torch.randn(4)
    assert_close("out with bias", module(gate, up, weight, bias), F.linear(swiglu_reference(gate, up), weight.double(),
                                                                           bias.double()), 1e-5)


# ---------------------------------------------------------------- GPU (large shapes; run on the GPU machine)


@pytest.mark.gpu
def test_triton_large_shapes_on_gpu(monkeypatch):
    monkeypatch.setenv("FLA_BACKEND", "triton")
    device, dtype = "cuda", torch.bfloat16
    shape, out_features = (8, 2048, 2816), 1024
    gate = (2 * torch.randn(shape, device=device)).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    g1, u1 = leaves(gate, up)
    swiglu(g1, u1).backward(dy)
    g2, u2 = leaves(gate.double(), up.double())
    y_ref = swiglu_reference(g2, u2)
    y_ref.backward(dy.double())
    assert_close("y", swiglu(gate, up), y_ref, 1e-2)
    assert_close("dgate", g1.grad, g2.grad, 1e-2)
    assert_close("dup", u1.grad, u2.grad, 1e-2)
    del g2, u2, y_ref, dy

    weight = (torch.randn(out_features, shape[-1], device=device) / shape[-1] ** 0.5).to(dtype)
    g1, u1, w1 = leaves(gate, up, weight)
    out = swiglu_linear(g1, u1, w1)
    dout = torch.randn_like(out)
    out.backward(dout)
    g2, u2, w2 = leaves(gate.float(), up.float(), weight.float())
    out_ref = F.linear(F.silu(g2) * u2, w2)
    out_ref.backward(dout.float())
    for name, a, b in (("out", out, out_ref), ("dgate", g1.grad, g2.grad), ("dup", u1.grad, u2.grad),
                       ("dweight", w1.grad, w2.grad)):
        assert_close(name, a, b, 1e-2)


@pytest.mark.gpu
def test_gated_mlp_bf16_on_gpu(monkeypatch):
    monkeypatch.setenv("FLA_BACKEND", "triton")
    mlp = GatedMLP(1024).to("cuda", torch.bfloat16)
    x = torch.randn(4, 2048, 1024, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(x)
    x1 = x.clone().requires_grad_(True)
    out = mlp(x1)
    out.backward(dout)
    x2 = x.double().requires_grad_(True)
    out_ref, ws = mlp_reference(mlp, x2)
    out_ref.backward(dout.double())
    assert_close("out", out, out_ref, 1e-2)
    assert_close("dx", x1.grad, x2.grad, 1e-2)
    for name, w in zip(("gate_proj", "up_proj", "down_proj"), ws):
        assert_close(f"d{name}", getattr(mlp, name).weight.grad, w.grad, 1e-2)
