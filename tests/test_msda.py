"""Multi-scale deformable attention: the PyTorch reference, the CUDA kernels and the dispatcher.

* always (CPU): reference vs a float64 brute-force loop, gradcheck, bad-input messages, ONNX export
  (when onnx/onnxruntime are installed), NVRTC compilation of every kernel for sm_75 and sm_90;
* with g++ (CPU): the CUDA kernels themselves, compiled as C++ with tests/msda_cpu_emulation.h
  (every CUDA thread a std::thread, a barrier per warp shuffle) and driven by the real host code of
  detlearn.ops.msda_cupy: forward, all three gradients, every dtype and vector width, determinism;
* with CUDA + CuPy: the same checks on the GPU, plus float64 gradcheck, autocast, CUDA graphs,
  every load/atomic path (16-byte, scalar for odd C or a misaligned base, sm_90 vector atomics),
  the full DINO encoder size against the float64 reference, and bit-identical deterministic runs.
  Memory checking for later: see the compute-sanitizer command in nbs/2_deformable_attention/12_ops_msda_bench.ipynb.
"""
import ctypes
import importlib.util
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from detlearn.ops import msda as msda_module
from detlearn.ops import msda_cupy as mc
from detlearn.ops.msda import (compute_level_start_index, ms_deform_attn, ms_deform_attn_loop, ms_deform_attn_pytorch,
                               random_msda_inputs)
from detlearn.utils import DetlearnError, resource_dir

HAS_CUPY = importlib.util.find_spec('cupy') is not None
needs_cupy = pytest.mark.skipif(not HAS_CUPY, reason='CuPy is not installed')
needs_gpu = pytest.mark.skipif(not (HAS_CUPY and torch.cuda.is_available()), reason='needs CUDA and CuPy')
TESTS = Path(__file__).resolve().parent

LEVELS = {1: [(5, 7)], 2: [(6, 5), (3, 3)], 3: [(4, 5), (2, 3), (1, 1)], 4: [(6, 8), (3, 4), (2, 2), (1, 1)],
          5: [(7, 6), (4, 3), (2, 2), (1, 2), (1, 1)]}


def as_double(inp):
    """The inputs in float64 (the rounded values of low-precision inputs, exactly)."""
    return tuple(t.double() if t.is_floating_point() else t for t in inp)


def reference_grads(inp, grad_out):
    """Output and gradients (value, locations, weights) of the reference in float64."""
    value, shapes, starts, locs, weights = as_double(inp)
    value, locs, weights = (t.detach().clone().requires_grad_() for t in (value, locs, weights))
    out = ms_deform_attn_pytorch(value, shapes, starts, locs, weights)
    out.backward(grad_out.double())
    return out.detach(), value.grad, locs.grad, weights.grad


def assert_close(actual, expected, rel):
    """|actual - expected| <= rel * max|expected| (+ a tiny absolute floor)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rel * scale + 1e-12, f'max error {err:.3g} > {rel} x {scale:.3g}'


# ------------------------------------------------------------------ reference (CPU, always)
@pytest.mark.parametrize('kind', ['random', 'dino'])
@pytest.mark.parametrize('n_levels', [1, 2, 3, 4, 5])
def test_reference_matches_loop(kind, n_levels):
    inp = random_msda_inputs(2, 3, 2, 4, LEVELS[n_levels], points=2, kind=kind, dtype=torch.float64, seed=n_levels)
    assert_close(ms_deform_attn_pytorch(*inp), ms_deform_attn_loop(*inp), 1e-12)


@pytest.mark.parametrize('batch,queries', [(1, 1), (1, 4), (3, 1)])
def test_reference_small_batches_and_single_query(batch, queries):
    inp = random_msda_inputs(batch, queries, 3, 5, LEVELS[3], points=3, dtype=torch.float64)
    out = ms_deform_attn_pytorch(*inp)
    assert out.shape == (batch, queries, 15)
    assert_close(out, ms_deform_attn_loop(*inp), 1e-12)


def test_reference_points_outside_read_zero():
    inp = list(random_msda_inputs(1, 4, 2, 3, LEVELS[2], dtype=torch.float64))
    inp[3] = torch.full_like(inp[3], 1.5)          # every point beyond the right/bottom border by > 1 pixel
    assert ms_deform_attn_pytorch(*inp).abs().max() == 0
    inp[3] = torch.full_like(inp[3], -0.5)
    assert ms_deform_attn_pytorch(*inp).abs().max() == 0


def test_reference_non_contiguous_inputs():
    value, shapes, starts, locs, weights = random_msda_inputs(2, 4, 3, 6, LEVELS[2], dtype=torch.float64)
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)        # (B, S, H, C) view, other strides
    locs_nc = torch.stack([locs, locs], dim=-1).flatten(-2)[..., ::2]                           # stride 2 in the last dim
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_nc.is_contiguous() or locs_nc.is_contiguous() or weights_nc.is_contiguous())
    assert_close(ms_deform_attn_pytorch(value_nc, shapes, starts, locs_nc, weights_nc),
                 ms_deform_attn_loop(value, shapes, starts, locs, weights), 1e-12)


def test_reference_gradcheck():
    value, shapes, starts, locs, weights = random_msda_inputs(1, 2, 2, 3, [(3, 4), (2, 2)], points=2, dtype=torch.float64)
    tensors = tuple(t.requires_grad_() for t in (value, locs, weights))
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn_pytorch(v, shapes, starts, l, a), tensors)


def test_level_start_index():
    assert compute_level_start_index(torch.tensor([[100, 167], [50, 84], [25, 42], [13, 21]])).tolist() == \
        [0, 16700, 20900, 21950]


def test_bad_inputs_have_clear_messages():
    value, shapes, starts, locs, weights = random_msda_inputs(1, 2, 2, 4, LEVELS[2])
    with pytest.raises(DetlearnError, match=r'attention_weights must be \(B, Q, H, L, P\)'):
        ms_deform_attn(value, shapes, starts, locs, weights[..., 0])
    with pytest.raises(DetlearnError, match='L=2 levels but spatial_shapes has 1'):
        ms_deform_attn(value, shapes[:1], starts[:1], locs, weights)
    with pytest.raises(DetlearnError, match='value has B=1, H=4 but sampling_locations has B=1, H=2'):
        ms_deform_attn(value.repeat(1, 1, 2, 1), shapes, starts, locs, weights)
    with pytest.raises(DetlearnError, match=r'S=39 tokens but spatial_shapes \[\(6, 5\), \(3, 4\)\] add up to 42'):
        ms_deform_attn(value, [(6, 5), (3, 4)], starts, locs, weights)
    with pytest.raises(DetlearnError, match='kind must be'):
        random_msda_inputs(1, 1, 1, 1, [(1, 1)], kind='nope')


def test_dispatcher_uses_reference_on_cpu():
    inp = random_msda_inputs(2, 3, 2, 8, LEVELS[3], kind='dino')
    assert torch.equal(ms_deform_attn(*inp), ms_deform_attn_pytorch(*inp))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    levels = [(6, 5), (3, 3)]

    class Attn(torch.nn.Module):
        def forward(self, value, locs, weights):
            return ms_deform_attn(value, levels, compute_level_start_index(levels), locs, weights)

    value, _, _, locs, weights = random_msda_inputs(1, 4, 2, 8, levels, kind='dino')
    path = tmp_path / 'msda.onnx'
    torch.onnx.export(Attn().eval(), (value, locs, weights), str(path), opset_version=18, dynamo=True)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, [value.numpy(), locs.numpy(), weights.numpy()])))
    assert_close(torch.from_numpy(got), ms_deform_attn_loop(value, levels, compute_level_start_index(levels), locs, weights), 1e-5)


# ------------------------------------------------------------------ NVRTC compilation (CPU, always)
@needs_cupy
@pytest.mark.parametrize('arch', ['compute_75', 'compute_80', 'compute_90'])
def test_every_kernel_compiles_with_nvrtc(arch):
    lowered = mc.nvrtc_compile_check(arch)
    assert set(lowered) == set(mc.kernel_names())
    for dt in (0, 1, 2):   # fp32 / fp16 / bf16: 16-byte and scalar paths, every backward mapping and mode
        v = mc.VECTOR_WIDTH[dt]
        for name in (f'msda_forward<{dt}, {v}>', f'msda_forward<{dt}, 1>', f'msda_backward<{dt}, {v}, 1, false>',
                     f'msda_backward<{dt}, {v}, 4, false>', f'msda_backward<{dt}, {v}, 1, true>',
                     f'msda_backward<{dt}, 1, 1, false>', f'msda_backward<{dt}, 1, 1, true>',
                     f'msda_fixed_to_value<{dt}>'):
            assert lowered[name].startswith('_Z')
    assert {'msda_forward<3, 1>', 'msda_backward<3, 1, 1, true>', 'msda_fixed_to_value<3>'} <= set(lowered)


@needs_cupy
@pytest.mark.parametrize('arch', ['compute_75', 'compute_80', 'compute_90'])
def test_ptx_keeps_the_design_promises(arch):
    """In the PTX: no fp16/bf16 arithmetic (sm_75 has no bf16 ALU), 16-byte loads, vector atomics only on sm_90."""
    import re
    from cupy.cuda import nvrtc
    prog = nvrtc.createProgram(mc.kernel_source(), mc.KERNEL_FILE, [], [])
    for name in mc.kernel_names(): nvrtc.addNameExpression(prog, name)
    nvrtc.compileProgram(prog, [f'-arch={arch}', *mc.COMPILE_OPTIONS])
    ptx = nvrtc.getPTX(prog).decode()
    nvrtc.destroyProgram(prog)
    assert not re.search(r'\b(add|sub|mul|fma|neg|min|max)(\.[a-z0-9]+)*\.(bf16|f16)(x2)?\b', ptx)
    assert 'cvt.f32.f16' in ptx and 'ld.global.nc.v4.u32' in ptx and 'shfl.sync.bfly' in ptx
    assert 'ld.global.nc.v2.u32' in ptx                                          # fp16/bf16 runs of 4 (G = 4)
    assert 'atom.global.add.u64' in ptx or 'red.global.add.u64' in ptx          # deterministic fixed point
    assert ('add.v4.f32' in ptx) == (arch == 'compute_90')


@needs_cupy
def test_compile_check_reports_the_compiler_log(monkeypatch):
    monkeypatch.setattr(mc, 'kernel_source', lambda: 'this is not CUDA')
    with pytest.raises(RuntimeError, match='NVRTC could not compile'):
        mc.nvrtc_compile_check('compute_75')


def test_kernel_source_is_bundled():
    assert (resource_dir('cupy_kernels') / mc.KERNEL_FILE).is_file()


# ------------------------------------------------------------------ the kernels on the CPU (emulated)
@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    """A ctypes launcher running msda.cu's kernels on the CPU (see tests/msda_cpu_emulation.h)."""
    compiler = shutil.which('g++')
    if compiler is None: pytest.skip('g++ is not installed')
    lib_path = tmp_path_factory.mktemp('msda_emu') / 'msda_emu.so'
    subprocess.run([compiler, '-O1', '-std=c++20', '-shared', '-fPIC', '-pthread', '-Wno-unknown-pragmas',
                    f'-I{TESTS}', f'-I{resource_dir("cupy_kernels")}', str(TESTS / 'msda_cpu_emulation.cpp'),
                    '-o', str(lib_path)], check=True, capture_output=True, timeout=300)
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_run.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint64)]

    def launch(name, threads, args, device):
        assert device.type == 'cpu'
        slots = (ctypes.c_uint64 * len(args))(*[int(a) & 0xFFFFFFFFFFFFFFFF for a in args])
        status = lib.emu_run(name.encode(), (threads + mc.BLOCK - 1) // mc.BLOCK, mc.BLOCK, slots)
        assert status != 2, f'{name}: a lane skipped a warp shuffle that the rest of its warp reached'
        assert status == 0, f'{name}: unknown kernel'
    return launch


def prepared(inp, dtype, misalign=False):
    """Kernel-ready CPU inputs (what ms_deform_attn_cupy hands to the Function); optionally a 4-byte-misaligned value."""
    value, shapes, starts, locs, weights = inp
    coords = torch.float64 if dtype == torch.float64 else torch.float32
    value = value.to(dtype)
    if misalign:  # same numbers, base address off by one element: forces the scalar path
        buffer = torch.empty(value.numel() + 1, dtype=dtype)
        buffer[1:] = value.flatten()
        value = buffer[1:].view(value.shape)
    return (value.contiguous() if not misalign else value, shapes.to(torch.int32), starts.to(torch.int32),
            locs.to(coords).contiguous(), weights.to(coords).contiguous())


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
# (dtype, channels, misalign): 16-byte paths, scalar fallbacks (C not a multiple of V, misaligned base),
# idle lanes (C = 48 fp32: 12 pieces on 16 lanes), several chunks (C = 160 fp32: 40 pieces on 32 lanes)
CASES = [(torch.float32, 32, False), (torch.float32, 16, True), (torch.float32, 48, False), (torch.float32, 160, False),
         (torch.float16, 32, False), (torch.float16, 12, False), (torch.float16, 64, True),
         (torch.bfloat16, 16, False), (torch.bfloat16, 64, False), (torch.float64, 8, False)]


@pytest.mark.parametrize('grain', [1, 4])
@pytest.mark.parametrize('dtype,channels,misalign', CASES, ids=lambda x: str(x).replace('torch.', ''))
def test_emulated_kernels_match_reference(emulator, dtype, channels, misalign, grain):
    n_levels = 1 + channels % 5
    inp = random_msda_inputs(2, 3, 2, channels, LEVELS[n_levels], points=3, kind='random', seed=channels)
    value, shapes, starts, locs, weights = prepared(inp, dtype, misalign)
    width = mc.VECTOR_WIDTH[mc.DTYPE_CODES[dtype]]
    v = mc.launch_config(channels, mc.DTYPE_CODES[dtype], value)[0]
    assert (v == 1) == (misalign or channels % width > 0 or width == 1)
    if v % grain:
        pytest.skip(f'no runs of {grain} with {v} channels per thread')
    grad_out = torch.randn(2, 3, 2 * channels, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref_out, ref_gv, ref_gl, ref_ga = reference_grads((value, shapes, starts, locs, weights), grad_out)
    out = mc.msda_forward_raw(value, shapes, starts, locs, weights, launch=emulator)
    assert out.dtype == dtype
    assert_close(out, ref_out, TOL[dtype])
    gv, gl, ga = mc.msda_backward_raw(grad_out, value, shapes, starts, locs, weights, grain=grain, launch=emulator)
    assert gv.dtype == dtype and gl.dtype == locs.dtype and ga.dtype == weights.dtype
    coords_tol = TOL[torch.float64] * 1e3 if dtype == torch.float64 else 2e-5  # fp32 sums of exactly rounded products
    assert_close(gv, ref_gv, TOL[dtype])
    assert_close(gl, ref_gl, coords_tol)
    assert_close(ga, ref_ga, coords_tol)
    if grain == 1 and not misalign:  # without the value gradient: no scatter, the same other gradients
        gv0, gl0, ga0 = mc.msda_backward_raw(grad_out, value, shapes, starts, locs, weights, value_grad=False,
                                             launch=emulator)
        assert gv0.numel() == 0 and torch.equal(gl0, gl) and torch.equal(ga0, ga)


@pytest.mark.parametrize('kind,batch,queries,n_levels', [('dino', 1, 1, 4), ('random', 1, 5, 5), ('dino', 2, 4, 2)])
def test_emulated_kernels_dino_like_and_edge_sizes(emulator, kind, batch, queries, n_levels):
    inp = random_msda_inputs(batch, queries, 3, 16, LEVELS[n_levels], points=4, kind=kind, seed=queries)
    value, shapes, starts, locs, weights = prepared(inp, torch.float32)
    grad_out = torch.randn(batch, queries, 48, generator=torch.Generator().manual_seed(2))
    ref = reference_grads((value, shapes, starts, locs, weights), grad_out)
    assert_close(mc.msda_forward_raw(value, shapes, starts, locs, weights, launch=emulator), ref[0], 2e-5)
    for got, expected in zip(mc.msda_backward_raw(grad_out, value, shapes, starts, locs, weights, launch=emulator), ref[1:]):
        assert_close(got, expected, 2e-5)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_emulated_deterministic_backward_is_bit_identical(emulator, dtype):
    # many queries on a tiny map: every value element receives dozens of racing contributions
    inp = random_msda_inputs(1, 24, 2, 8, [(2, 2), (1, 1)], points=4, kind='dino', seed=3)
    value, shapes, starts, locs, weights = prepared(inp, dtype)
    grad_out = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    runs = [mc.msda_backward_raw(grad_out, value, shapes, starts, locs, weights, deterministic=True, launch=emulator)
            for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run): assert torch.equal(a, b)
    ref = reference_grads((value, shapes, starts, locs, weights), grad_out)
    assert_close(runs[0][0], ref[1], TOL[dtype])
    assert_close(runs[0][1], ref[2], 2e-5)


# ------------------------------------------------------------------ the kernels on a GPU
@needs_gpu
@pytest.mark.parametrize('kind', ['random', 'dino'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('channels', [16, 32, 64])
@pytest.mark.parametrize('n_levels', [1, 2, 3, 4, 5])
def test_gpu_kernel_matches_reference(kind, dtype, channels, n_levels):
    inp = random_msda_inputs(2, 37, 8, channels, LEVELS[n_levels], points=4, kind=kind, dtype=dtype, device='cuda')
    grad_out = torch.randn(2, 37, 8 * channels, device='cuda').to(dtype)
    ref = reference_grads(inp, grad_out)
    value, shapes, starts, locs, weights = (t.clone().requires_grad_() if t.is_floating_point() else t for t in inp)
    out = mc.ms_deform_attn_cupy(value, shapes, starts, locs, weights)
    out.backward(grad_out)
    assert_close(out, ref[0], TOL[dtype])
    assert_close(value.grad, ref[1], TOL[dtype])
    assert_close(locs.grad, ref[2], 1e-4)
    assert_close(weights.grad, ref[3], 1e-4)


@needs_gpu
@pytest.mark.parametrize('batch,queries', [(1, 1), (1, 300), (3, 1)])
def test_gpu_small_batches_single_query_and_non_contiguous(batch, queries):
    value, shapes, starts, locs, weights = random_msda_inputs(batch, queries, 8, 32, LEVELS[4], kind='dino', device='cuda')
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    locs_nc = torch.stack([locs, locs], dim=-1).flatten(-2)[..., ::2]
    assert not (value_nc.is_contiguous() or locs_nc.is_contiguous())
    out = mc.ms_deform_attn_cupy(value_nc, shapes, starts, locs_nc, weights)
    assert_close(out, ms_deform_attn_pytorch(*as_double((value, shapes, starts, locs, weights))), 2e-5)


@needs_gpu
def test_gpu_gradcheck_float64():
    inp = random_msda_inputs(1, 3, 2, 4, [(4, 5), (2, 3)], points=2, dtype=torch.float64, device='cuda')
    value, shapes, starts, locs, weights = inp
    tensors = tuple(t.clone().requires_grad_() for t in (value, locs, weights))
    assert torch.autograd.gradcheck(lambda v, l, a: mc.ms_deform_attn_cupy(v, shapes, starts, l, a), tensors)


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_deterministic_backward_is_bit_identical(dtype):
    inp = random_msda_inputs(2, 2000, 8, 32, [(20, 20), (10, 10)], kind='dino', dtype=dtype, device='cuda')
    grad_out = torch.randn(2, 2000, 256, device='cuda').to(dtype)
    runs = []
    for _ in range(3):
        value, shapes, starts, locs, weights = (t.clone().requires_grad_() if t.is_floating_point() else t for t in inp)
        mc.ms_deform_attn_cupy(value, shapes, starts, locs, weights, deterministic=True).backward(grad_out)
        runs.append((value.grad, locs.grad, weights.grad))
    for run in runs[1:]:
        for a, b in zip(runs[0], run): assert torch.equal(a, b)
    assert_close(runs[0][0], reference_grads(inp, grad_out)[1], TOL[dtype])


@needs_gpu
def test_gpu_autocast_and_dispatcher():
    value, shapes, starts, locs, weights = random_msda_inputs(2, 50, 8, 32, LEVELS[4], kind='dino', device='cuda')
    proj = torch.nn.Linear(32, 32).cuda()
    with torch.autocast('cuda', dtype=torch.float16):
        v = proj(value)                                  # fp16 under autocast
        out = ms_deform_attn(v, shapes, starts, locs.half(), weights.half())
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    ref = ms_deform_attn_pytorch(v.detach().double(), shapes, starts, locs.half().double(), weights.half().double())
    assert_close(out, ref, 2e-3)


@needs_gpu
def test_gpu_runs_on_current_stream_and_in_cuda_graph():
    inp = random_msda_inputs(2, 100, 8, 32, LEVELS[4], kind='dino', device='cuda')
    expected = mc.ms_deform_attn_cupy(*inp)              # first call compiles, outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = mc.ms_deform_attn_cupy(*inp)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)


@needs_gpu
def test_gpu_kernel_memory_not_above_reference():
    inp = random_msda_inputs(2, 2000, 8, 32, [(50, 84), (25, 42), (13, 21), (7, 11)], kind='dino', device='cuda')
    peaks = []
    for fn in (mc.ms_deform_attn_cupy, ms_deform_attn_pytorch):
        value, shapes, starts, locs, weights = (t.clone().requires_grad_() if t.is_floating_point() else t for t in inp)
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(value, shapes, starts, locs, weights).sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[0] <= peaks[1]


DINO_ENCODER = dict(batch=2, queries=22_223, heads=8, channels=32, points=4)  # 800x1333, 4 levels
DINO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]                     # S = 22,223


def kernel_grads(inp, grad_out, deterministic=False):
    """Output and gradients (value, locations, weights) of ms_deform_attn_cupy."""
    value, shapes, starts, locs, weights = inp
    leaves = [t.detach().clone().requires_grad_() for t in (value, locs, weights)]
    out = mc.ms_deform_attn_cupy(leaves[0], shapes, starts, leaves[1], leaves[2], deterministic=deterministic)
    out.backward(grad_out)
    return out.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gpu_dino_encoder_size_matches_float64_reference(dtype):
    """B=2, S=Q=22,223, H=8, C=32, L=4, P=4: forward and all gradients against the float64 reference."""
    inp = random_msda_inputs(**DINO_ENCODER, spatial_shapes=DINO_LEVELS, kind='dino', dtype=dtype, device='cuda')
    grad_out = torch.randn(2, 22_223, 256, device='cuda').to(dtype)
    ref = reference_grads(inp, grad_out)
    got = kernel_grads(inp, grad_out)
    coords_tol = 1e-10 if dtype == torch.float64 else 1e-4
    for g, r, tol in zip(got, ref, (TOL[dtype], TOL[dtype], coords_tol, coords_tol)):
        assert_close(g, r, tol)
    runs = [kernel_grads(inp, grad_out, deterministic=True) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0][1:], run[1:]):
            assert torch.equal(a, b)                                     # bit-identical over 3 runs
    assert_close(runs[0][1], ref[1], TOL[dtype])


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_both_value_gradient_mappings(dtype):
    """G = 1 (interleaved channels, scalar atomics) and G = 4 (runs of 4; vector atomics on sm_90) agree."""
    inp = random_msda_inputs(2, 300, 8, 32, LEVELS[4], kind='dino', dtype=dtype, device='cuda')
    value, shapes, starts, locs, weights = mc.prepare_kernel_inputs(*inp)
    grad_out = torch.randn(2, 300, 256, device='cuda').to(dtype)
    ref = reference_grads(inp, grad_out)
    for grain in (1, 4):
        got = mc.msda_backward_raw(grad_out, value, shapes, starts, locs, weights, grain=grain)
        for g, r, tol in zip(got, ref[1:], (TOL[dtype], 1e-4, 1e-4)):
            assert_close(g, r, tol)
    vector = mc.has_vector_atomics(value.device)
    assert (torch.cuda.get_device_capability()[0] >= 9) == vector
    assert mc.backward_grain(mc.launch_config(32, mc.DTYPE_CODES[dtype], value)[0], False, vector) == \
        (4 if vector else 1)


@needs_gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                    reason='vector atomics need sm_90')
def test_gpu_sm90_vector_atomic_path_is_the_default():
    inp = random_msda_inputs(2, 500, 8, 32, LEVELS[4], kind='dino', device='cuda')
    value, shapes, starts, locs, weights = mc.prepare_kernel_inputs(*inp)
    grad_out = torch.randn(2, 500, 256, device='cuda')
    names = []
    real_launch = mc.default_launch

    def spy(name, *args):
        names.append(name)
        return real_launch(name, *args)
    mc.msda_backward_raw(grad_out, value, shapes, starts, locs, weights, launch=spy)
    assert names == ['msda_backward<0, 4, 4, false>']
    got = mc.msda_backward_raw(grad_out, value, shapes, starts, locs, weights)
    assert_close(got[0], reference_grads(inp, grad_out)[1], 2e-5)


@needs_gpu
@pytest.mark.parametrize('dtype,channels,misalign', [(torch.float32, 30, False), (torch.float16, 12, False),
                                                     (torch.bfloat16, 20, False), (torch.float32, 32, True),
                                                     (torch.float16, 32, True), (torch.bfloat16, 64, True)])
def test_gpu_scalar_paths_odd_channels_and_misaligned_base(dtype, channels, misalign):
    inp = random_msda_inputs(2, 40, 4, channels, LEVELS[3], kind='random', seed=channels)
    value, shapes, starts, locs, weights = prepared(inp, dtype, misalign)
    value, shapes, starts, locs, weights = (t.cuda() for t in (value, shapes, starts, locs, weights))
    if misalign:  # .cuda() copies into a fresh, aligned buffer: misalign again on the device
        buffer = torch.empty(value.numel() + 1, dtype=dtype, device='cuda')
        buffer[1:] = value.flatten()
        value = buffer[1:].view(value.shape)
    assert mc.launch_config(channels, mc.DTYPE_CODES[dtype], value)[0] == 1
    grad_out = torch.randn(2, 40, 4 * channels, device='cuda').to(dtype)
    ref = reference_grads((value, shapes, starts, locs, weights), grad_out)
    assert_close(mc.msda_forward_raw(value, shapes, starts, locs, weights), ref[0], TOL[dtype])
    got = mc.msda_backward_raw(grad_out, value, shapes, starts, locs, weights)
    for g, r, tol in zip(got, ref[1:], (TOL[dtype], 1e-4, 1e-4)):
        assert_close(g, r, tol)


@needs_gpu
def test_gpu_custom_op_opcheck_and_torch_compile():
    inp = random_msda_inputs(2, 50, 8, 32, LEVELS[4], kind='dino', device='cuda')
    value, shapes, starts, locs, weights = mc.prepare_kernel_inputs(*inp)
    leaves = [t.clone().requires_grad_() for t in (value, locs, weights)]
    torch.library.opcheck(torch.ops.detlearn.msda_forward.default, (leaves[0], shapes, starts, leaves[1], leaves[2],
                                                                      False))
    fn = lambda v, l, a: mc.ms_deform_attn_cupy(v, shapes, starts, l, a)
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(*leaves)
    assert_close(out, ms_deform_attn_pytorch(*as_double(inp)), 2e-5)
    out.sum().backward()
    assert all(t.grad is not None for t in leaves)


@needs_gpu
def test_gpu_dispatcher_under_torch_compile_uses_the_kernel_after_an_eager_call():
    inp = random_msda_inputs(2, 50, 8, 32, LEVELS[4], kind='dino', device='cuda')
    eager = ms_deform_attn(*inp)                                        # builds the kernel, remembers it
    assert f'{inp[0].device}-{inp[0].dtype}' in msda_module._kernel_ready
    compiled = torch.compile(lambda *a: ms_deform_attn(*a), fullgraph=True)
    assert torch.equal(compiled(*inp), eager)


# ------------------------------------------------------------------ host side (CPU, mocks)
@pytest.fixture
def fresh_dispatcher(monkeypatch):
    """The dispatcher's memory of failures and notices, emptied for one test."""
    monkeypatch.setattr(msda_module, '_announced', set())
    monkeypatch.setattr(msda_module, '_kernel_failures', {})
    monkeypatch.setattr(msda_module, '_kernel_ready', set())


def kernel_notices(value, args, calls=2):
    """The warnings `_kernel_output` gives over `calls` calls (each must fall back to the reference)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(calls):
            assert msda_module._kernel_output(value, args, False) is None
    return [str(w.message) for w in caught]


@needs_cupy
def test_fallback_notice_names_a_compile_error_once(monkeypatch, fresh_dispatcher):
    inp = random_msda_inputs(1, 2, 2, 4, LEVELS[1])
    calls = []

    def broken(device, dtype):
        calls.append(1)
        raise RuntimeError('nvrtc: libnvrtc.so not found')
    monkeypatch.setattr(mc, 'compile_kernels', broken)
    notices = kernel_notices(inp[0], inp)
    assert len(notices) == 1 and 'libnvrtc.so not found' in notices[0] and 'not installed' not in notices[0]
    assert len(calls) == 1                                    # remembered: no retry


@needs_cupy
def test_fallback_notice_names_a_launch_error_once(monkeypatch, fresh_dispatcher):
    inp = random_msda_inputs(1, 2, 2, 4, LEVELS[1])
    monkeypatch.setattr(mc, 'compile_kernels', lambda device, dtype: None)
    calls = []

    def failing(*args, deterministic):
        calls.append(1)
        raise RuntimeError('CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES')
    monkeypatch.setattr(mc, 'ms_deform_attn_cupy', failing)
    notices = kernel_notices(inp[0], inp)
    assert len(notices) == 1 and 'failed to launch' in notices[0] and 'OUT_OF_RESOURCES' in notices[0]
    assert len(calls) == 1


def test_fallback_notice_when_cupy_is_missing(monkeypatch, fresh_dispatcher):
    monkeypatch.setitem(sys.modules, 'cupy', None)            # `import cupy` raises ImportError
    inp = random_msda_inputs(1, 2, 2, 4, LEVELS[1])
    notices = kernel_notices(inp[0], inp)
    assert len(notices) == 1 and 'CuPy could not be imported' in notices[0] and 'cupy-cuda12x' in notices[0]


@needs_cupy
def test_kernel_success_is_remembered_for_torch_compile(monkeypatch, fresh_dispatcher):
    inp = random_msda_inputs(1, 2, 2, 4, LEVELS[1])
    monkeypatch.setattr(mc, 'compile_kernels', lambda device, dtype: None)
    monkeypatch.setattr(mc, 'ms_deform_attn_cupy', lambda *args, deterministic: 'kernel output')
    assert msda_module._kernel_output(inp[0], inp, False) == 'kernel output'
    assert 'cpu-torch.float32' in msda_module._kernel_ready


def test_external_stream_without_cuda_stream_protocol():
    """CuPy >= 14 with torch < 2.10 (no `__cuda_stream__`): the raw pointer goes to ExternalStream."""
    from types import SimpleNamespace
    calls = []
    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(
        Stream=SimpleNamespace(from_external=lambda s: calls.append('from_external')),
        ExternalStream=lambda ptr, device: calls.append(('ExternalStream', ptr, device))))
    mc._external_stream(fake_cupy, SimpleNamespace(cuda_stream=77), 1)
    mc._external_stream(fake_cupy, SimpleNamespace(cuda_stream=77, __cuda_stream__=lambda: (1, 77)), 1)
    assert calls == [('ExternalStream', 77, 1), 'from_external']
    old_cupy = SimpleNamespace(cuda=SimpleNamespace(Stream=object, ExternalStream=lambda ptr, device: 'old'))
    assert mc._external_stream(old_cupy, SimpleNamespace(cuda_stream=77, __cuda_stream__=None), 0) == 'old'


def test_module_imports_on_torch_before_2_4(tmp_path):
    """torch 2.1-2.3: no torch.amp.custom_fwd, no torch.library.custom_op; the module still imports and works."""
    script = tmp_path / 'old_torch.py'
    script.write_text("""
import torch
import torchvision  # its own imports need the new torch; the op module (imported by `detlearn`) is what is tested
calls = []
def fake_custom_fwd(fwd):
    calls.append('fwd')
    return fwd
def fake_custom_bwd(bwd):
    calls.append('bwd')
    return bwd
del torch.amp.custom_fwd, torch.amp.custom_bwd, torch.library.custom_op
torch.cuda.amp.custom_fwd, torch.cuda.amp.custom_bwd = fake_custom_fwd, fake_custom_bwd
from detlearn.ops import msda_cupy as mc
from detlearn.ops.msda import random_msda_inputs, ms_deform_attn_pytorch
assert calls == ['fwd', 'bwd'], calls
assert not hasattr(torch.ops.detlearn, 'msda_forward')
print('imported')
""")
    env = {'PYTHONPATH': str(TESTS.parent), 'OMP_NUM_THREADS': '1', 'PATH': '/usr/bin:/bin'}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and 'imported' in run.stdout, run.stderr[-2000:]


def test_raw_entry_points_refuse_unprepared_inputs():
    value, shapes, starts, locs, weights = random_msda_inputs(1, 2, 2, 4, LEVELS[2])
    shapes32, starts32 = shapes.to(torch.int32), starts.to(torch.int32)
    with pytest.raises(DetlearnError, match='must be int32'):         # int64 read as int32 pairs: out of bounds
        mc.msda_forward_raw(value, shapes, starts, locs, weights)
    with pytest.raises(DetlearnError, match='need torch.float32 locations and weights'):  # fp16 read as float
        mc.msda_forward_raw(value, shapes32, starts32, locs.half(), weights)
    with pytest.raises(DetlearnError, match='contiguous'):
        mc.msda_backward_raw(torch.zeros(1, 2, 8), value.transpose(1, 2).contiguous().transpose(1, 2), shapes32,
                             starts32, locs, weights)
    with pytest.raises(DetlearnError, match=r'need \(L, 2\) shapes'):
        mc.msda_forward_raw(value, shapes32[:1], starts32, locs, weights)
    with pytest.raises(DetlearnError, match='no kernel with G=4'):
        mc.msda_backward_raw(torch.zeros(1, 2, 8), value, shapes32, starts32, locs, weights, deterministic=True,
                             grain=4, launch=lambda *a: None)
    with pytest.raises(TypeError):                                     # deterministic is keyword-only
        mc.msda_backward_raw(torch.zeros(1, 2, 8), value, shapes32, starts32, locs, weights, True)


def test_prepare_converts_official_inputs_and_caches_level_tables():
    value, shapes, starts, locs, weights = random_msda_inputs(1, 2, 2, 4, LEVELS[2])
    prepared = mc.prepare_kernel_inputs(value, shapes, starts, locs.half(), weights.double())
    mc.check_prepared(*prepared)
    assert prepared[1].tolist() == shapes.tolist() and prepared[2].tolist() == starts.tolist()
    again = mc.prepare_kernel_inputs(value, shapes.tolist(), starts.tolist(), locs, weights)
    assert again[1] is prepared[1] and again[2] is prepared[2]        # built once: no copy per call
    with pytest.raises(DetlearnError, match='must hold integers'):
        mc.prepare_kernel_inputs(value, shapes.float(), starts, locs, weights)
    with pytest.raises(DetlearnError, match='S=39 tokens'):
        mc.prepare_kernel_inputs(value, [(6, 5), (3, 4)], starts, locs, weights)


def test_official_call_of_the_function_is_not_deterministic_mode(emulator, monkeypatch):
    """apply(..., im2col_step=64) with int64 shapes (the official call) runs the default mode; a bool there is refused."""
    monkeypatch.setattr(mc, 'default_launch', emulator)
    seen, real_backward = [], mc.msda_backward_raw
    monkeypatch.setattr(mc, 'msda_backward_raw', lambda *a, **k: seen.append(k) or real_backward(*a, **k))
    value, shapes, starts, locs, weights = random_msda_inputs(1, 3, 2, 4, LEVELS[2], seed=4)
    leaves = [t.clone().requires_grad_() for t in (value, locs, weights)]
    out = mc.MSDeformAttnFunction.apply(leaves[0], shapes, starts, leaves[1], leaves[2], 64)
    assert_close(out, ms_deform_attn_pytorch(*as_double((value, shapes, starts, locs, weights))), 2e-5)
    with pytest.raises(DetlearnError, match="integer im2col_step"):
        mc.MSDeformAttnFunction.apply(leaves[0], shapes, starts, leaves[1], leaves[2], True)
    out.sum().backward()
    assert len(seen) == 1 and seen[0]['deterministic'] is False


def test_custom_op_opcheck_and_torch_compile_on_cpu():
    """The registered op (CPU: the reference inside) passes opcheck and compiles with fullgraph=True."""
    if not hasattr(torch.library, 'custom_op'):
        pytest.skip('torch < 2.4 has no torch.library.custom_op')
    inp = random_msda_inputs(1, 3, 2, 4, LEVELS[2], points=2, dtype=torch.float64, seed=2)
    value, shapes, starts, locs, weights = mc.prepare_kernel_inputs(*inp)
    leaves = [t.clone().requires_grad_() for t in (value, locs, weights)]
    torch.library.opcheck(torch.ops.detlearn.msda_forward.default, (leaves[0], shapes, starts, leaves[1], leaves[2],
                                                                      False))
    grad_out = torch.randn(1, 3, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.detlearn.msda_backward.default,
                          (grad_out, value, shapes, starts, locs, weights, False, True))
    torch.library.opcheck(torch.ops.detlearn.msda_backward.default,
                          (grad_out, value, shapes, starts, locs, weights, True, False))

    def fn(v, l, a):
        return torch.ops.detlearn.msda_forward(v, shapes, starts, l, a, False)
    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
    out = compiled(*leaves)
    out.backward(grad_out)
    ref = reference_grads(inp, grad_out)
    assert_close(out, ref[0], 1e-12)
    for leaf, expected in zip(leaves, ref[1:]):
        assert_close(leaf.grad, expected, 1e-12)
    frozen = [leaves[0].detach(), leaves[1].detach().requires_grad_(), leaves[2].detach()]
    fn(*frozen).sum().backward()                                        # value needs no gradient: not computed
    assert frozen[1].grad is not None and frozen[0].grad is None


def test_emulated_autograd_function_and_gradcheck(emulator, monkeypatch):
    """The autograd.Function (official call, gradient order, dtypes) through the emulated kernels; gradcheck in float64."""
    monkeypatch.setattr(mc, 'default_launch', emulator)
    inp = random_msda_inputs(1, 2, 2, 2, [(3, 4), (2, 2)], points=2, kind='random', dtype=torch.float64, seed=5)
    value, shapes, starts, locs, weights = inp                          # int64 shapes, as the official op gets them
    leaves = tuple(t.clone().requires_grad_() for t in (value, locs, weights))
    fn = lambda v, l, a: mc.MSDeformAttnFunction.apply(v, shapes, starts, l, a, 64)
    assert torch.autograd.gradcheck(fn, leaves)
    grad_out = torch.randn(1, 2, 4, dtype=torch.float64)
    fn(*leaves).backward(grad_out)
    for got, expected in zip((t.grad for t in leaves), reference_grads(inp, grad_out)[1:]):
        assert_close(got, expected, 1e-10)


def test_emulated_function_with_fp16_coordinates(emulator, monkeypatch):
    """fp16 locations/weights (autocast) are converted, and their gradients come back in fp16."""
    monkeypatch.setattr(mc, 'default_launch', emulator)
    inp = random_msda_inputs(1, 3, 2, 8, LEVELS[2], points=2, kind='dino', seed=6)
    value, shapes, starts = inp[0], inp[1], inp[2]
    locs, weights = (t.half().requires_grad_() for t in inp[3:])
    out = mc.MSDeformAttnFunction.apply(value, shapes, starts, locs, weights, 64)
    out.sum().backward()
    assert locs.grad.dtype == torch.float16 and weights.grad.dtype == torch.float16
    ref = reference_grads((value, shapes, starts, locs.detach(), weights.detach()), torch.ones_like(out))
    assert_close(out, ref[0], 2e-5)
    assert_close(locs.grad, ref[2], 2e-3)


def test_dispatcher_compile_branch_traces_with_fullgraph(monkeypatch, fresh_dispatcher):
    """Under torch.compile the dispatcher reaches the custom op with no graph break (CPU stand-in for CUDA)."""
    if not hasattr(torch.library, 'custom_op'):
        pytest.skip('torch < 2.4 has no torch.library.custom_op')
    inp = random_msda_inputs(1, 3, 2, 4, LEVELS[2], points=2, seed=3)

    def cpu_kernel(value, spatial_shapes, level_start_index, locs, weights, *, deterministic):
        prepared = mc.prepare_kernel_inputs(value, spatial_shapes, level_start_index, locs, weights)
        return torch.ops.detlearn.msda_forward(*prepared, deterministic)
    monkeypatch.setattr(mc, 'ms_deform_attn_cupy', cpu_kernel)
    msda_module._kernel_ready.add('cpu-torch.float32')
    compiled = torch.compile(lambda *a: msda_module._run_kernel(a[0], a, False)[0], fullgraph=True,
                             backend='aot_eager')
    assert_close(compiled(*inp), ms_deform_attn_pytorch(*as_double(inp)), 2e-5)
    msda_module._kernel_ready.clear()
    assert torch.compile(lambda *a: msda_module._run_kernel(a[0], a, False)[1], fullgraph=True,
                         backend='aot_eager')(*inp).startswith('the kernel was not built')


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_emulated_unsampled_nan_pixel_does_not_leak(emulator, dtype):
    """Corner loads are unconditional (clamped addresses): a NaN pixel that no sample covers must not leak."""
    inp = random_msda_inputs(1, 4, 2, 8, [(3, 4), (2, 2)], points=2, kind='random', seed=9)
    value, shapes, starts, locs, weights = prepared(inp, dtype)
    value = value.clone()
    value[:, 0] = float('nan')                                # pixel (0, 0) of level 0, the clamp target
    locs = locs.clone()
    locs[:, :, :, 0] = torch.tensor([-0.9, -0.9])             # level 0: every point far outside the top-left
    locs[:, 0, 0, 0, 0] = torch.tensor([float('nan'), 0.5])   # and one NaN location
    grad_out = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = mc.msda_forward_raw(value, shapes, starts, locs, weights, launch=emulator)
    gv, gl, ga = mc.msda_backward_raw(grad_out, value, shapes, starts, locs, weights, launch=emulator)
    assert torch.isfinite(out).all() and torch.isfinite(gl).all() and torch.isfinite(ga).all()
    assert torch.isfinite(gv).all() and (gv[:, 0] == 0).all()   # nothing scattered to the unsampled pixel
    clean = value.clone()
    clean[:, 0] = 0                                           # the same op with the NaN pixel zeroed
    assert_close(out, ms_deform_attn_pytorch(*as_double((clean, shapes, starts, locs.nan_to_num(-0.9), weights))),
                 TOL[dtype])
