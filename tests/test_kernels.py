"""Mixed-bit dequant-GEMM: packing vs compressed-tensors, Triton kernel vs the PyTorch reference, QuantLinear.

On the CPU the Triton kernel runs under TRITON_INTERPRET=1, set here before the kernel module is imported
(the interpreter reads it when @triton.jit decorates). GPU tests are marked `gpu` and skip without CUDA.
"""

import importlib
import logging
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from tasa_deploy import UsageError  # noqa: E402
from tasa_deploy.kernels import mixed_gemm, quant_linear, reference, vllm_plugin  # noqa: E402

if not HAS_CUDA:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(mixed_gemm._dequant_gemm_kernel, InterpretedFunction):  # imported before the env was set
        mixed_gemm = importlib.reload(mixed_gemm)

DEVICE = "cuda" if HAS_CUDA else "cpu"
BITS = (2, 3, 4, 8)


def random_layer(n: int, k: int, bits: int, group: int, seed: int = 0):
    """Random codes [N, K], their packed form and fp16 scales [N, K/G]."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int64).to(torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    return codes, reference.pack_codes(codes, bits), scales


def assert_matches_reference(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to fp32 summation order: one output ulp plus a tiny absolute floor."""
    eps = torch.finfo(ref.dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), rtol=eps, atol=1e-5 * ref.float().abs().max().item())


# ------------------------------------------------------------------------------------------ packing layout
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [128, 96, 576])
def test_pack_codes_equals_compressed_tensors(bits, k):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes, packed, _ = random_layer(8, k, bits, 32, seed=bits)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors packs q, not u
    assert torch.equal(packed, pack_to_int32(signed, bits))
    assert packed.shape == (8, reference.packed_words(k, bits))
    assert torch.equal(reference.unpack_codes(packed, bits, k), codes)
    unpacked = unpack_from_int32(packed, bits, torch.Size((8, k)))
    assert torch.equal(unpacked.to(torch.int16) + 2 ** (bits - 1), codes.to(torch.int16))


def test_three_bit_values_straddle_words():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b110  # bits 30..32: bit 31 is word 0's sign bit, the high bit starts word 1
    packed = reference.pack_codes(codes, 3)
    assert packed.tolist() == [[-(2**31), 1, 0]]
    x = torch.zeros(1, 32).half()
    x[0, 10] = 1.0
    y = mixed_gemm.mixed_gemm(x.to(DEVICE), packed.to(DEVICE), torch.ones(1, 1).half().to(DEVICE), 3, 32)
    assert y.item() == 0b110 - 4  # the kernel joins both words: u = 6, q = u - 2**(3-1)


def test_dequantize_packed_matches_quantized_tensor():
    from tasa_deploy.quant.rtn import quantize_rtn
    from tasa_deploy.quant.spec import QuantSpec

    weight = torch.randn(64, 256)
    for bits in BITS:
        qt = quantize_rtn(weight, QuantSpec(bits, 64))
        packed = reference.pack_codes(qt.codes, bits)
        dense = reference.dequantize_packed(packed, qt.scales, bits, 64, 256)
        assert torch.equal(dense, qt.dequantize())


# ------------------------------------------------------------------------------------------ kernel vs reference
SHAPES = [(128, 256, 128), (256, 128, 64), (160, 256, 32)]  # (N, K, group); N = 160 leaves a ragged N tile


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 3, 17, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference(bits, m, dtype):
    n, k, group = SHAPES[(bits + m) % len(SHAPES)]
    _, packed, scales = random_layer(n, k, bits, group, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(bits)).to(dtype)
    ref = reference.mixed_gemm_reference(x, packed, scales, bits, group)
    y = mixed_gemm.mixed_gemm(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), bits, group)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_matches_reference(y.cpu(), ref)


@pytest.mark.parametrize("bits", [3, 4])
def test_split_k_and_per_channel(bits):
    """Forced split-K (partials summed on the host), and a per-channel scale (group = K)."""
    n, k = 128, 512
    _, packed, scales = random_layer(n, k, bits, 128)
    x = torch.randn(2, k).half()
    config = mixed_gemm.LaunchConfig(block_m=16, block_n=64, block_k=128, split_k=3)
    y = mixed_gemm.mixed_gemm(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), bits, 128, config)
    assert_matches_reference(y.cpu(), reference.mixed_gemm_reference(x, packed, scales, bits, 128))
    channel_scales = scales[:, :1].contiguous()  # [N, 1]
    y = mixed_gemm.mixed_gemm(x.to(DEVICE), packed.to(DEVICE), channel_scales.to(DEVICE), bits, k)
    assert_matches_reference(y.cpu(), reference.mixed_gemm_reference(x, packed, channel_scales, bits, k))


@pytest.mark.parametrize("m", [1, 20])
def test_kernel_at_smollm2_width(m):
    """K = 576 (SmolLM2's hidden size, group 64): K tiles that are not a power-of-two count."""
    _, packed, scales = random_layer(64, 576, 3, 64)
    x = torch.randn(m, 576).half()
    y = mixed_gemm.mixed_gemm(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), 3, 64)
    assert_matches_reference(y.cpu(), reference.mixed_gemm_reference(x, packed, scales, 3, 64))


def test_kernel_equals_dense_matmul_of_quantized_weight():
    """End to end against an independent path: QuantizedTensor.dequantize() and torch.matmul."""
    from tasa_deploy.quant.rtn import quantize_rtn
    from tasa_deploy.quant.spec import QuantSpec

    weight, x = torch.randn(128, 256), torch.randn(5, 256).half()
    qt = quantize_rtn(weight, QuantSpec(3, 64))
    y = mixed_gemm.mixed_gemm(x.to(DEVICE), reference.pack_codes(qt.codes, 3).to(DEVICE), qt.scales.to(DEVICE), 3, 64)
    dense = x.float() @ qt.dequantize().half().float().T  # [5, 128]
    assert_matches_reference(y.cpu(), dense.half())


# ------------------------------------------------------------------------------------------ refused input
def _bad_operands():
    _, packed, scales = random_layer(128, 256, 4, 128)
    x = torch.randn(1, 256).half()
    return [
        (dict(bits=5), "5-bit"),
        (dict(group_size=96), "group size 96"),
        (dict(x=x.float()), "float16 or bfloat16"),
        (dict(x=torch.randn(1, 384).half()), "words per row"),
        (dict(packed=packed.to(torch.int64)), "int32"),
        (dict(scales=scales[:, :1].contiguous()), "scales are"),
        (dict(bits=3), "words per row"),
    ], dict(x=x, packed=packed, scales=scales, bits=4, group_size=128)


@pytest.mark.parametrize("case", range(7))
def test_bad_input_is_refused_before_launch(case):
    cases, good = _bad_operands()
    override, message = cases[case]
    args = {**good, **override}
    with pytest.raises(ValueError, match=message) as info:
        mixed_gemm.mixed_gemm(**args)
    assert isinstance(info.value, UsageError)


# ------------------------------------------------------------------------------------------ QuantLinear
def _tiny_artifact(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasa_deploy.artifacts import BitPlan, ModulePlan
    from tasa_deploy.quantized_dir import load_artifact, save_artifact
    from tasa_deploy.model import model_fingerprint, quantizable_modules
    from tasa_deploy.quant.rtn import quantize_rtn
    from tasa_deploy.quant.spec import QuantSpec

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "base")
    linears = quantizable_modules(model)
    group_specs = [{"q_proj": (3, 64), "k_proj": (3, 64), "v_proj": (3, 64), "o_proj": (4, 128),  # fused groups
                    "gate_proj": (2, 32), "up_proj": (2, 32), "down_proj": (8, 128)},                # share a spec
                   {"q_proj": (4, 32), "k_proj": (4, 32), "v_proj": (4, 32), "o_proj": (2, 64),
                    "gate_proj": (3, 128), "up_proj": (3, 128), "down_proj": (3, 64)}]
    specs = {name: QuantSpec(*group_specs[int(name.split(".")[2])][name.rsplit(".", 1)[1]]) for name in linears}
    modules = {name: quantize_rtn(linear.weight.detach(), specs[name]) for name, linear in linears.items()}
    names = set(linears)
    tensors = {key: value for key, value in model.state_dict().items() if key.rsplit(".", 1)[0] not in names}
    plan = BitPlan(model_fingerprint(model), "vllm", {n: ModulePlan(s, "rtn") for n, s in specs.items()})
    save_artifact(tmp_path / "q", base_model_dir=tmp_path / "base", plan=plan, modules=modules, tensors=tensors)
    return model, load_artifact(tmp_path / "q")


def test_replace_linears_matches_fake_quant_logits(tmp_path):
    model, artifact = _tiny_artifact(tmp_path)
    model.load_state_dict(artifact.dense_state_dict(), strict=False)  # the fake-quant model
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = model(tokens).logits
        quant_linear.replace_linears(model, artifact, backend="reference")
        packed_logits = model(tokens).logits
    swapped = [m for m in model.modules() if isinstance(m, quant_linear.QuantLinear)]
    assert len(swapped) == len(artifact.modules) == 14
    assert {m.bits for m in swapped} == set(BITS)
    torch.testing.assert_close(packed_logits, dense_logits, rtol=1e-5, atol=1e-5)


def test_kernel_reads_the_vllm_export(tmp_path):
    """Cross-check with the exporter: run the kernel on its compressed-tensors tensors, compare to the artifact."""
    vllm_export = pytest.importorskip("tasa_deploy.exporters.vllm")
    from safetensors.torch import load_file

    _, artifact = _tiny_artifact(tmp_path)
    vllm_export.export_vllm(tmp_path / "q", tmp_path / "ct")
    exported = load_file(str(tmp_path / "ct" / "model.safetensors"))
    x = torch.randn(3, 128).half()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.o_proj"):
        qt = artifact.modules[name]
        packed, scales = exported[f"{name}.weight_packed"], exported[f"{name}.weight_scale"]
        y = mixed_gemm.mixed_gemm(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), qt.bits, qt.group_size)
        dense = x.float() @ qt.dequantize().half().float().T  # [3, N]
        assert_matches_reference(y.cpu(), dense.half())


def test_replace_linears_refuses_asymmetric_without_touching_model(tmp_path):
    from dataclasses import replace

    model, artifact = _tiny_artifact(tmp_path)
    first = next(iter(artifact.modules))
    bad = dict(artifact.modules)
    bad[first] = replace(bad[first], symmetric=False)
    with pytest.raises(UsageError, match="asymmetric"):
        quant_linear.replace_linears(model, replace(artifact, modules=bad))
    assert not any(isinstance(m, quant_linear.QuantLinear) for m in model.modules())


def test_quant_linear_rejects_unknown_backend_and_width():
    with pytest.raises(UsageError, match="backend"):
        quant_linear.QuantLinear(128, 64, 4, 128, backend="cuda")
    with pytest.raises(UsageError, match="6-bit"):
        quant_linear.QuantLinear(128, 64, 6, 128)


# ------------------------------------------------------------------------------------------ vLLM plugin
def test_vllm_register_is_a_logged_noop_without_vllm(caplog):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed; the no-op path does not apply")
    with caplog.at_level(logging.INFO, logger=vllm_plugin.__name__):
        assert vllm_plugin.register() is None
    assert "vllm is not installed" in caplog.text


@pytest.mark.parametrize("args, reason", [
    ((3, 4, False, False, torch.float16, 128, 4096), None),
    ((2, 2, False, False, torch.bfloat16, -1, 576), None),
    ((4, 8, True, False, torch.float16, 128, 4096), "symmetric"),
    ((3, 3, False, False, torch.float16, 128, 4096), "symmetric"),
    ((5, 16, False, False, torch.float16, 128, 4096), "5-bit"),
    ((4, 8, False, True, torch.float16, 128, 4096), "g_idx"),
    ((4, 8, False, False, torch.float32, 128, 4096), "float16"),
    ((4, 8, False, False, torch.float16, 256, 4096), "group size 256"),
    ((4, 8, False, False, torch.float16, 128, 4032), "does not divide"),
])
def test_vllm_layer_support(args, reason):
    found = vllm_plugin.layer_support(*args)
    assert (found is None) if reason is None else (reason in found)


def test_vllm_apply_packed_linear_matches_dense():
    _, packed, scales = random_layer(64, 128, 3, 32)
    x, bias = torch.randn(2, 5, 128), torch.randn(64)
    y = vllm_plugin.apply_packed_linear(x, packed, scales, 3, 32, bias)  # [2, 5, 64]
    dense = reference.dequantize_packed(packed, scales, 3, 32, 128)
    torch.testing.assert_close(y, x @ dense.T + bias, rtol=1e-5, atol=1e-5)


def test_vllm_kernel_lists_get_our_kernel_once():
    class Marlin:  # stands for a kernel class in vLLM's list: only __name__ is read
        pass

    kernel = type(vllm_plugin.KERNEL_NAME, (), {})
    kernels = [Marlin]
    assert vllm_plugin._append_kernel(kernels, kernel) and kernels == [Marlin, kernel]
    assert not vllm_plugin._append_kernel(kernels, kernel) and kernels == [Marlin, kernel]


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 7, 16, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llama_shape(bits, m, dtype):
    _, packed, scales = random_layer(1024, 4096, bits, 128)
    x = torch.randn(m, 4096).to(dtype)
    y = mixed_gemm.mixed_gemm(x.cuda(), packed.cuda(), scales.cuda(), bits, 128)
    assert_matches_reference(y.cpu(), reference.mixed_gemm_reference(x, packed, scales, bits, 128))


def test_vllm_cpu_kernel_dense_weight_is_the_dequantize_reference():
    """The CPU kernel's load-time transform equals reference.dequantize_packed, rounded to the activation dtype;
    per-channel (group_size -1) reads one scale per row."""
    for bits, group in ((3, 32), (8, 64), (4, -1)):
        k = 128
        _, packed, scales = random_layer(48, k, bits, k if group == -1 else group)
        for dtype in (torch.float32, torch.bfloat16):
            got = vllm_plugin.dense_weight(packed, scales, bits, group, k, dtype)
            want = reference.dequantize_packed(packed, scales, bits, k if group == -1 else group, k).to(dtype)
            assert got.dtype == dtype and torch.equal(got, want)


def test_vllm_cpu_kernel_accepts_float32_activations():
    """vLLM's CPU backend may run float32; the GPU kernel refuses it, the CPU kernel serves it."""
    args = (3, 4, False, False, torch.float32, 128, 4096)
    assert "float16" in vllm_plugin.layer_support(*args)
    assert vllm_plugin.layer_support(*args, vllm_plugin.CPU_ACTIVATION_DTYPES) is None


def test_vllm_registry_gets_each_kernel_on_its_platforms_once():
    class Platform:  # stands for vLLM's PlatformEnum members: only .name is read
        def __init__(self, name):
            self.name = name

    cuda, cpu = Platform("CUDA"), Platform("CPU")
    registry = {cuda: [], cpu: []}
    gpu_kernel = type(vllm_plugin.KERNEL_NAME, (), {})
    cpu_kernel = type(vllm_plugin.CPU_KERNEL_NAME, (), {})
    assert vllm_plugin._append_kernel(registry, gpu_kernel)
    assert vllm_plugin._append_kernel(registry, cpu_kernel, ("CPU",))
    assert not vllm_plugin._append_kernel(registry, cpu_kernel, ("CPU",))
    assert registry == {cuda: [gpu_kernel], cpu: [cpu_kernel]}
    assert vllm_plugin._registered_kernel(registry, vllm_plugin.CPU_KERNEL_NAME) is cpu_kernel
