"""GGML grids: our packed bytes, read back by gguf-py's reference dequantizer, equal our own dequantize
bit for bit; legacy RTN is byte-identical to gguf.quants.quantize; GPTQ on a k-quant grid beats RTN."""

import gguf
import numpy as np
import pytest
import torch

from tasa_deploy import UsageError
from tasa_deploy.exporters.gguf_pack import GGUF_QTYPE, pack_quantized
from tasa_deploy.quant.gptq import accumulate_hessian, make_empty_hessian, quantize_weight
from tasa_deploy.quant.rtn import quantize_rtn
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor

LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
KQUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def _awkward_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights [rows, cols] plus the cases that break packers: a zero block, a constant block,
    an all-positive row, outliers, and tiny values."""
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * 0.02
    w[0, :256] = 0.0
    w[1, :256] = 0.013
    w[2] = w[2].abs() + 0.01
    w[3, 7] = 0.9
    w[4, 100] = -0.7
    w[5] *= 1e-4
    return w


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("type_name", LEGACY + KQUANTS)
def test_packed_bytes_dequantize_exactly_as_ours(type_name):
    w = _awkward_weight(16, 512)
    qt = quantize_rtn(w, QuantSpec.for_ggml(type_name))
    packed = pack_quantized(qt)  # [N, bytes per row]
    reference = gguf.quants.dequantize(packed, GGUF_QTYPE[type_name])  # [N, K]
    assert _bit_equal(reference, qt.dequantize().numpy())
    assert qt.codes.max() <= 2**qt.bits - 1


@pytest.mark.parametrize("type_name", LEGACY)
def test_legacy_rtn_bytes_equal_gguf_quantize(type_name):
    w = _awkward_weight(16, 512, seed=1)
    ours = pack_quantized(quantize_rtn(w, QuantSpec.for_ggml(type_name)))
    theirs = gguf.quants.quantize(w.numpy(), GGUF_QTYPE[type_name])
    assert np.array_equal(ours, theirs)


def test_kquant_error_falls_with_bits_and_beats_legacy():
    w = torch.randn(64, 512) * 0.02
    err = {t: float(((quantize_rtn(w, QuantSpec.for_ggml(t)).dequantize() - w) ** 2).mean() / (w**2).mean())
           for t in KQUANTS + ("q4_0",)}
    assert err["q2_k"] > err["q3_k"] > err["q4_k"] > err["q5_k"] > err["q6_k"]
    assert err["q4_k"] < err["q4_0"]  # sub-block scales + mins: a finer 4-bit grid than q4_0
    assert err["q4_k"] < 0.006 and err["q6_k"] < 0.0005  # Gaussian weights: 4-bit ~0.5%, 6-bit ~0.03%


def _correlated_hessian(cols: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    mixing = torch.randn(cols, cols) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols) @ mixing * torch.linspace(0.2, 3.0, cols)  # [T, K] correlated, uneven scale
    hessian, _ = accumulate_hessian(make_empty_hessian(cols), 0, x)
    return hessian


@pytest.mark.parametrize("type_name", ["q3_k", "q4_k"])
def test_gptq_on_kquant_grid_beats_rtn(type_name):
    torch.manual_seed(3)
    w = torch.randn(32, 256) * 0.02
    hessian = _correlated_hessian(256)
    spec = QuantSpec.for_ggml(type_name)
    gptq, _ = quantize_weight(w, hessian, spec)
    rtn = quantize_rtn(w, spec)

    def weighted_error(qt: QuantizedTensor) -> float:
        delta = qt.dequantize() - w  # [N, K]
        return float(torch.einsum("nk,kl,nl->", delta, hessian, delta))

    assert weighted_error(gptq) < 0.9 * weighted_error(rtn)  # GPTQ minimizes exactly this
    packed = pack_quantized(gptq)  # GPTQ output packs losslessly too
    assert _bit_equal(gguf.quants.dequantize(packed, GGUF_QTYPE[type_name]), gptq.dequantize().numpy())


@pytest.mark.parametrize("type_name", KQUANTS)
def test_kquant_refuses_rows_not_a_multiple_of_256(type_name):
    with pytest.raises(UsageError, match="blocks of 256"):
        quantize_rtn(torch.randn(4, 576), QuantSpec.for_ggml(type_name))
    assert quantize_rtn(torch.randn(4, 576), QuantSpec.for_ggml("q4_0")).shape == (4, 576)


def test_quantized_tensor_survives_flat_tensor_roundtrip():
    qt = quantize_rtn(torch.randn(8, 256), QuantSpec.for_ggml("q5_k"))
    back = QuantizedTensor.from_tensors("m", qt.tensors("m"), qt.fmt, qt.bits, qt.group_size, qt.symmetric)
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert np.array_equal(pack_quantized(back), pack_quantized(qt))
