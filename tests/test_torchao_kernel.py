"""kernel="torchao" (torchao's own grouped GEMMs behind moeq's registry) and the
emulated-fallback warning of kernel selection.

CPU runs torchao's MXFP8 EMULATED mode (its to_mx quantization, dequantize, bf16
``torch._grouped_mm``) and compares it with moeq's emulated kernel: bitwise for bf16
inputs; for fp32 inputs the forward is bitwise and the gradients equal moeq's with the
output gradient rounded to bf16 first (torchao's output is bf16, so autograd casts the
incoming gradient to bf16). torchao's FP8 rowwise has no CPU mode: the tests pin that
torchao itself refuses and that moeq says so. torchao's SM100 MXFP8 path cannot run here;
selection is tested for every architecture through ``DeviceInfo`` values, and GPU tests
(marked ``gpu``) compare the real kernels where a GPU runs them.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from moeq.ops import registry as dispatch
from moeq.ops import torchao_kernel as tk
from moeq.ops.device import DeviceInfo
from moeq.ops.registry import EmulatedKernelWarning
from moeq.ops.grouped_mm import quantized_grouped_mm
from moeq.numerics.recipes import QuantizationType

FP8, MXFP8, BF16 = QuantizationType.FP8, QuantizationType.MXFP8, QuantizationType.BF16
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CPU = DeviceInfo("cpu")
SM80, SM90, SM100, SM120 = (DeviceInfo("cuda", 0, cap) for cap in ((8, 0), (9, 0), (10, 0), (12, 0)))
ROCM = DeviceInfo("cuda", 0, (9, 4), hip=True)


def _offs(counts) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def _case(dtype, seed=0, kind="gauss"):
    """Groups of 64, 0, 96, 128 and 37 rows (an empty group, an unaligned last end), then
    6 slack rows of NaN; K=128, N=96."""
    gen = torch.Generator().manual_seed(seed)
    offs = _offs([64, 0, 96, 128, 37])
    m, k, n, e = int(offs[-1]) + 6, 128, 96, 5

    def data(shape):
        x = torch.randn(shape, generator=gen)
        return x * torch.exp(1.5 * torch.randn(shape, generator=gen)) if kind == "heavy" else x

    a = data((m, k)).to(dtype)
    a[offs[-1]:] = float("nan")  # slack rows are never read
    b = (data((e, n, k)) / math.sqrt(k)).to(dtype)
    return a, b, data((m, n)).to(dtype), offs


def _fwd_bwd(a, b, grad_out, offs, kernel, qtype="mxfp8"):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = quantized_grouped_mm(a, b, offs, qtype=qtype, kernel=kernel, check_finite=False)
    return (out, *torch.autograd.grad(out, (a, b), grad_out))


# --------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("seed,kind", [(0, "gauss"), (1, "heavy")])
def test_torchao_mxfp8_emulated_equals_moeq_emulated_bitwise_on_bf16(seed, kind):
    a, b, grad_out, offs = _case(torch.bfloat16, seed, kind)
    tao = _fwd_bwd(a, b, grad_out, offs, "torchao")
    emu = _fwd_bwd(a, b, grad_out, offs, "emulated")
    for name, t, e in zip(("out", "grad_a", "grad_b"), tao, emu):
        assert t.dtype == e.dtype == torch.bfloat16
        assert torch.equal(t, e), f"{name} differs"
    end = int(offs[-1])
    assert torch.all(tao[0][end:] == 0) and torch.all(tao[1][end:] == 0), "slack rows zero"
    assert torch.all(tao[2][1] == 0), "empty group: zero weight gradient"


def test_torchao_fp32_gradients_are_moeq_with_grad_out_rounded_to_bf16():
    a, b, grad_out, offs = _case(torch.float32, seed=2)
    tao = _fwd_bwd(a, b, grad_out, offs, "torchao")
    emu = _fwd_bwd(a, b, grad_out, offs, "emulated")
    assert all(t.dtype == torch.float32 for t in tao)
    assert torch.equal(tao[0], emu[0]), "forward is bitwise equal"
    # moeq quantizes the fp32 grad_out; torchao gets it rounded to bf16 (its output is
    # bf16): the measured difference (docs/recipes.md: worst 3.4% over 18 cases) ...
    rel = [((t.double() - e.double()).norm() / e.double().norm()).item() for t, e in zip(tao[1:], emu[1:])]
    assert all(0 < r < 0.05 for r in rel), rel
    # ... is exactly that rounding
    emu_rounded = _fwd_bwd(a, b, grad_out.to(torch.bfloat16).float(), offs, "emulated")
    for t, e in zip(tao, emu_rounded):
        assert torch.equal(t, e)


def test_torchao_kernel_runs_torchaos_own_emulated_gemms(monkeypatch):
    """The result comes from torchao's forward, dgrad and wgrad, not from moeq's code."""
    import torchao.prototype.moe_training.mxfp8_grouped_mm as tao_mx

    calls = []
    for name in ("_compute_fwd_emulated", "_compute_dgrad_emulated", "_compute_wgrad_emulated"):
        original = getattr(tao_mx, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tao_mx, name, spy)
    a, b, grad_out, offs = _case(torch.bfloat16)
    _fwd_bwd(a, b, grad_out, offs, "torchao")
    assert sorted(calls) == ["_compute_dgrad_emulated", "_compute_fwd_emulated", "_compute_wgrad_emulated"]


def test_sm100_relayout_of_128_rows_changes_nothing():
    """The SM100 path re-lays groups out to multiples of 128 rows; run through torchao's
    emulated mode here, that layout gives bitwise the results of the 32-row one."""
    a, b, grad_out, offs = _case(torch.bfloat16, seed=3)
    results = []
    for alignment in (tk.MXFP8_EMULATED_ALIGNMENT, tk.MXFP8_SM100_ALIGNMENT):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = tk.torchao_mxfp8_grouped_mm(a_, b_, offs, emulated=True, alignment=alignment)
        results.append((out, *torch.autograd.grad(out, (a_, b_), grad_out)))
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_regroup_index_maps():
    offs = _offs([32, 0, 64, 5])  # ends 32, 32, 96, 101; M = 104 (3 slack rows)
    layout = tk.regroup(offs, 104, 128)
    assert layout.offs.tolist() == [128, 128, 256, 384]
    assert layout.src_rows.shape == (640,)  # round_up(104 + 4 * 127, 128): from shapes only
    x = torch.arange(104.0).unsqueeze(1)
    packed = tk._gather_rows(x, layout.src_rows, layout.src_valid).squeeze(1)
    want = torch.zeros(640)
    want[0:32] = torch.arange(0.0, 32)
    want[128:192] = torch.arange(32.0, 96)
    want[256:261] = torch.arange(96.0, 101)
    assert torch.equal(packed, want)
    back = tk._gather_rows(packed.unsqueeze(1), layout.dst_rows, layout.dst_valid).squeeze(1)
    assert torch.equal(back, torch.cat([torch.arange(101.0), torch.zeros(3)]))


def test_torchao_kernel_through_convert_model():
    from moeq.convert import convert_model
    from moeq.nn.experts import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(64, 96, 4, dtype=torch.bfloat16)
    tokens = torch.randn(40, 64, dtype=torch.bfloat16)
    idx = torch.randint(0, 4, (40, 2))
    weights = torch.rand(40, 2, dtype=torch.bfloat16)
    results = []
    for kernel in ("torchao", "emulated"):
        model = convert_model(torch.nn.Sequential(copy.deepcopy(experts)), "mxfp8", kernel=kernel)
        out = model[0].routed_forward(tokens, idx, weights)
        out.float().square().sum().backward()
        results.append((out, model[0].gate_up_proj.grad, model[0].down_proj.grad))
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_torchao_kernel_checks_like_the_others():
    a, b, _, offs = _case(torch.bfloat16)
    with pytest.raises(ValueError, match="a contains NaN"):  # slack rows are NaN here
        quantized_grouped_mm(a, b, offs, qtype="mxfp8", kernel="torchao")
    a = a.nan_to_num(0.0).requires_grad_()
    out = quantized_grouped_mm(a, b, offs, qtype="mxfp8", kernel="torchao")
    with pytest.raises(ValueError, match="grad_out .* contains NaN"):
        out.backward(torch.full_like(out, float("nan")))
    with pytest.raises(ValueError, match="start at a multiple of 32 rows"):
        quantized_grouped_mm(a, b, _offs([16, 48, 0, 0, 0]), qtype="mxfp8", kernel="torchao")


def test_torchao_fp8_has_no_cpu_mode():
    """torchao's FP8 rowwise grouped GEMM itself refuses CPU tensors, so moeq refuses it."""
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    with pytest.raises(NotImplementedError, match="requires triton"):
        _to_fp8_rowwise_then_scaled_grouped_mm(
            torch.randn(32, 32, dtype=torch.bfloat16), torch.randn(1, 32, 32, dtype=torch.bfloat16).transpose(-2, -1),
            _offs([32]), pad_token_groups_for_grouped_mm=False,
        )
    a, b, _, offs = _case(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"kernel='torchao' cannot run fp8 on cpu: torchao's FP8 rowwise .*no emulated mode"):
        quantized_grouped_mm(a, b, offs, qtype="fp8", kernel="torchao")
    assert "torchao" not in dispatch.available_kernels("fp8", "cpu")


def test_torchao_is_a_named_kernel_and_rejects_bf16():
    assert "torchao" in dispatch.kernel_names() and dispatch.KERNEL_TORCHAO == "torchao"
    with pytest.raises(RuntimeError, match="kernel='torchao' does not implement bf16"):
        dispatch.select_kernel("torchao", "bf16", "cpu")


def test_import_moeq_does_not_import_torchao():
    import subprocess
    import sys

    code = "import sys, moeq, moeq.ops, moeq.convert; print('torchao' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- selection

@pytest.fixture
def sm100_kernels(monkeypatch):
    """Pretend torchao's SM100 MXFP8 kernels loaded (they cannot on this machine)."""
    monkeypatch.setattr(tk, "sm100_kernels_missing_reason", lambda: None)


@pytest.fixture(autouse=True)
def fresh_warnings():
    dispatch._warn_once.cache_clear()
    yield
    dispatch._warn_once.cache_clear()


def test_auto_takes_torchao_for_mxfp8_on_sm100_only(sm100_kernels):
    assert dispatch.choose_kernel("auto", "mxfp8", SM100).name == "torchao"
    assert dispatch.available_kernels("mxfp8", SM100)[0] == "torchao"
    assert dispatch.emulation_notice("auto", "mxfp8", SM100) is None
    for dev in (CPU, SM80, SM90, SM120, ROCM):  # never where torchao's SM100 path would crash
        assert dispatch.choose_kernel("auto", "mxfp8", dev).name == "emulated", dev
        assert dispatch.get_kernel("torchao").reason_emulated(MXFP8, dev) is not None
    # FP8 stays on moeq's "torch" kernel (same numerics, no re-layout), BF16 too
    for dev in (SM90, SM100):
        assert dispatch.choose_kernel("auto", "fp8", dev).name == "torch"
        assert dispatch.choose_kernel("auto", "bf16", dev).name == "torch"


def test_sm100_without_torchaos_kernels_falls_back_with_the_reason():
    assert tk.sm100_kernels_missing_reason() is not None  # a CPU build of torchao
    assert dispatch.choose_kernel("auto", "mxfp8", SM100).name == "emulated"
    notice = dispatch.emulation_notice("auto", "mxfp8", SM100)
    assert "cuda:0 (sm_100)" in notice and "kernel='torchao': torchao's" in notice
    assert "TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1" in notice  # set by tests/conftest.py


@pytest.mark.parametrize("dev", [SM80, SM90, SM120])
def test_explicit_torchao_mxfp8_off_sm100_runs_torchaos_emulated_mode(dev, sm100_kernels):
    assert dispatch.choose_kernel("torchao", "mxfp8", dev).name == "torchao"
    how = dispatch.get_kernel("torchao").reason_emulated(MXFP8, dev)
    assert "needs an NVIDIA SM100" in how and "EMULATED mode" in how


def test_torchao_fp8_needs_sm90_or_sm100():
    for dev in (CPU, SM80, SM120, ROCM):
        reason = dispatch.get_kernel("torchao").reason_unavailable(FP8, dev)
        assert reason is not None and "SM90/SM100" in reason, dev


def test_auto_on_a_gpu_without_a_native_kernel_warns_once_per_recipe_and_device():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the "once" must be moeq's, not Python's filter
        for _ in range(3):
            assert dispatch.select_kernel("auto", "mxfp8", SM90).name == "emulated"
        dispatch.select_kernel("auto", "mxfp8", SM80)  # another device
        dispatch.select_kernel("auto", "fp8", SM80)  # another recipe
        dispatch.select_kernel("auto", "fp8", SM90)  # native ("torch"): silent
        dispatch.select_kernel("auto", "bf16", SM80)  # nothing emulated: silent
        dispatch.select_kernel("emulated", "mxfp8", DeviceInfo("cuda", 1, (9, 0)))  # explicit: silent
        for _ in range(2):
            dispatch.select_kernel("auto", "mxfp8", CPU)  # the only way on CPU: silent
            dispatch.select_kernel("torchao", "mxfp8", CPU)
    messages = [str(w.message) for w in caught if issubclass(w.category, EmulatedKernelWarning)]
    assert len(messages) == len(caught) == 3, messages
    sm90, sm80_mx, sm80_fp8 = messages
    assert sm90.startswith("kernel='auto' runs mxfp8 on cuda:0 (sm_90) with emulated numerics")
    assert "kernel='torchao': torchao's native MXFP8 grouped GEMM needs an NVIDIA SM100" in sm90
    assert "kernel='emulated'" in sm90 and "recipe='bf16'" in sm90
    assert "cuda:0 (sm_80)" in sm80_mx and "mxfp8" in sm80_mx
    assert "fp8 on cuda:0 (sm_80)" in sm80_fp8 and "FP8 rowwise needs SM90 or SM100" in sm80_fp8


def test_explicit_torchao_on_a_gpu_off_sm100_warns_that_it_emulates():
    with pytest.warns(EmulatedKernelWarning, match=r"kernel='torchao' runs mxfp8 on cuda:0 \(sm_90\).*EMULATED mode"):
        dispatch.select_kernel("torchao", "mxfp8", SM90)


def test_no_notice_on_cpu_or_for_native_choices():
    assert dispatch.emulation_notice("auto", "mxfp8", CPU) is None
    assert dispatch.emulation_notice("torchao", "mxfp8", CPU) is None
    assert dispatch.emulation_notice("auto", "fp8", SM90) is None
    assert dispatch.emulation_notice("emulated", "fp8", SM80) is None


def test_cpu_calls_never_warn():
    a, b, grad_out, offs = _case(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmulatedKernelWarning)
        _fwd_bwd(a, b, grad_out, offs, "auto")
        _fwd_bwd(a, b, grad_out, offs, "torchao")


def test_device_info():
    assert dispatch.device_info("cpu") == CPU
    assert dispatch.device_info(SM90) is SM90
    assert str(SM100) == "cuda:0 (sm_100)" and SM100.arch == "sm_100"
    assert not ROCM.nvidia_cuda and str(ROCM) == "cuda:0 (ROCm)"


def test_kernel_entry_needs_one_form():
    emulated = dispatch.get_kernel("emulated")
    with pytest.raises(TypeError, match="give forward, dgrad and wgrad, or grouped_mm"):
        dispatch.GroupedMMKernel(name="x", qtypes=frozenset({FP8}), forward=emulated.forward,
                                 unsupported_reason=lambda q, d: None)
    with pytest.raises(TypeError, match="not both"):
        dispatch.GroupedMMKernel(name="x", qtypes=frozenset({FP8}), forward=emulated.forward,
                                 dgrad=emulated.dgrad, wgrad=emulated.wgrad, grouped_mm=emulated.forward,
                                 unsupported_reason=lambda q, d: None)


def test_torchao_path_traces_under_compile_fullgraph():
    a, b, grad_out, offs = _case(torch.bfloat16)
    a, grad_out = a[:331].nan_to_num(0.0), grad_out[:331]
    fn = torch.compile(
        lambda a, b: quantized_grouped_mm(a, b, offs, qtype="mxfp8", kernel="torchao"),
        fullgraph=True, backend="aot_eager",
    )
    a_c, b_c = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = fn(a_c, b_c)
    got = (out, *torch.autograd.grad(out, (a_c, b_c), grad_out))
    for x, y in zip(got, _fwd_bwd(a, b, grad_out, offs, "torchao")):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- GPU

def _cuda_case(qtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    align = {FP8: 16, MXFP8: 32}[qtype]
    offs = _offs([8 * align, 0, 20 * align, 3 * align, 0, 11 * align + 7]).cuda()
    m, k, n = int(offs[-1]) + 13, 512, 768
    a = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    b = (torch.randn(6, n, k, device="cuda", generator=gen) / math.sqrt(k)).to(torch.bfloat16)
    return a, b, torch.randn(m, n, device="cuda", generator=gen, dtype=torch.bfloat16), offs


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype", [FP8, MXFP8])
def test_gpu_torchao_kernel_matches_emulated(qtype):
    kernel = dispatch.get_kernel("torchao")
    if kernel.reason_unavailable(qtype, "cuda") is not None:
        pytest.skip(kernel.reason_unavailable(qtype, "cuda"))
    a, b, grad_out, offs = _cuda_case(qtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmulatedKernelWarning)
        got = _fwd_bwd(a, b, grad_out, offs, "torchao", qtype.value)
    emu = _fwd_bwd(a, b, grad_out, offs, "emulated", qtype.value)
    native = kernel.reason_emulated(qtype, "cuda") is None
    for name, g, e in zip(("out", "grad_a", "grad_b"), got, emu):
        rel = ((g.double() - e.double()).norm() / e.double().norm()).item()
        print(f"torchao {qtype.value} ({'native' if native else 'emulated'}) {name}: {rel:.2e} vs moeq emulated")
        # same quantized operands: only accumulation order (and fast accum) and bf16
        # output rounding differ
        assert rel < 5e-3
