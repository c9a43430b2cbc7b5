"""Decode GEMV bandwidth of the mixed-bit dequant-GEMM vs fp16 torch.matmul at Llama-3-8B shapes.

For each width b in {2, 3, 4, 8} (group 128) and each (K, N) in 4096x4096 (q/o proj), 4096x14336 (gate/up),
14336x4096 (down), times y = x @ W^T for one token (M = 1) with `tasa_deploy.kernels.mixed_gemm` and with
torch.matmul on the dense fp16 weight. Achieved GB/s counts the bytes each must read at least once (packed
words + fp16 scales, or the fp16 weight; plus x and y); % of peak divides by the device's HBM spec bandwidth
(table below) and by a measured device-to-device copy. Prints a rich table and writes
benchmarks/results/kernels.json. Without CUDA it says so, writes that nothing was measured, and exits 0.

    python benchmarks/bench_kernels.py [--m 1] [--out benchmarks/results/kernels.json]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from tasa_deploy.artifacts import write_json_atomic

LLAMA3_8B_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
WIDTHS = (2, 3, 4, 8)
GROUP = 128
SPEC_PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0,
                  "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0,
                  "L40S": 864.0, "RTX 4090": 1008.0}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "kernels.json"
console = Console()


def spec_peak_gbps(device_name: str) -> float | None:
    """HBM bandwidth from the vendor spec sheet, matched on the device name (None if unknown)."""
    for key, gbps in SPEC_PEAK_GBPS.items():
        if key in device_name:
            return gbps
    return None


def measured_copy_gbps() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second, an achievable-peak yardstick."""
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def random_packed_layer(n: int, k: int, bits: int):
    """Codes, packed words (row chunks keep the reference packer's memory small) and scales, on the GPU."""
    from tasa_deploy.kernels.reference import pack_codes

    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)  # [N, K]
    packed = torch.cat([pack_codes(chunk, bits) for chunk in codes.split(512)])  # [N, ceil(K*b/32)]
    scales = (torch.rand(n, k // GROUP) * 0.01 + 1e-3).to(torch.float16)  # [N, K/G]
    return codes.cuda(), packed.cuda(), scales.cuda()


def bench_shape(k: int, n: int, bits: int, m: int) -> dict:
    """Time ours and fp16 torch.matmul on one shape; check ours against the dense dequantized weight."""
    import triton.testing

    from tasa_deploy.kernels.mixed_gemm import mixed_gemm

    codes, packed, scales = random_packed_layer(n, k, bits)
    dense = ((codes.float() - 2 ** (bits - 1)) * scales.float().repeat_interleave(GROUP, 1)).half()  # [N, K]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ours_ms = triton.testing.do_bench(lambda: mixed_gemm(x, packed, scales, bits, GROUP), warmup=25, rep=200)
    fp16_ms = triton.testing.do_bench(lambda: torch.matmul(x, dense.T), warmup=25, rep=200)
    y, y_dense = mixed_gemm(x, packed, scales, bits, GROUP).float(), (x.float() @ dense.float().T)
    rel_err = ((y - y_dense).abs().max() / y_dense.abs().max()).item()
    io_bytes = 2 * (m * k + m * n)
    ours_bytes = packed.numel() * 4 + scales.numel() * 2 + io_bytes
    fp16_bytes = dense.numel() * 2 + io_bytes
    return {"K": k, "N": n, "bits": bits, "M": m, "group_size": GROUP,
            "ours_us": ours_ms * 1e3, "ours_gbps": ours_bytes / (ours_ms * 1e-3) / 1e9,
            "fp16_us": fp16_ms * 1e3, "fp16_gbps": fp16_bytes / (fp16_ms * 1e-3) / 1e9,
            "speedup_vs_fp16": fp16_ms / ours_ms, "max_rel_err_vs_dense": rel_err}


def print_table(rows: list[dict], spec_gbps: float | None, copy_gbps: float) -> None:
    table = Table(title=f"decode GEMV (M={rows[0]['M']}), group {GROUP}; peak: spec {spec_gbps or '?'} GB/s, "
                        f"copy {copy_gbps:.0f} GB/s")
    for column in ("K x N", "bits", "ours us", "ours GB/s", "% spec", "% copy", "fp16 us", "fp16 GB/s",
                   "speedup", "rel err"):
        table.add_column(column, justify="right")
    for row in rows:
        spec_pct = f"{100 * row['ours_gbps'] / spec_gbps:.0f}" if spec_gbps else "?"
        table.add_row(f"{row['K']}x{row['N']}", str(row["bits"]), f"{row['ours_us']:.1f}",
                      f"{row['ours_gbps']:.0f}", spec_pct, f"{100 * row['ours_gbps'] / copy_gbps:.0f}",
                      f"{row['fp16_us']:.1f}", f"{row['fp16_gbps']:.0f}", f"{row['speedup_vs_fp16']:.2f}x",
                      f"{row['max_rel_err_vs_dense']:.1e}")
    console.print(table)


def write_not_measured(out: Path) -> None:
    """Record that no GPU was available, without overwriting figures a GPU run already wrote."""
    if out.exists() and json.loads(out.read_text()).get("measured"):
        console.print(f"kept the GPU figures already in {out}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"measured": False, "reason": "no CUDA device on this machine; GPU figures not measured",
                            "shapes": [list(s) for s in LLAMA3_8B_SHAPES],
                            "widths": list(WIDTHS)}, foreign_ok=True)
    console.print(f"wrote {out} (measured: false)")


def main(m: Annotated[int, typer.Option(help="tokens per call (1 = decode)")] = 1,
         out: Annotated[Path, typer.Option(help="JSON results file")] = DEFAULT_OUT) -> None:
    if not torch.cuda.is_available():
        console.print("no CUDA GPU: the decode GEMV bandwidth cannot be measured here (run on a GPU machine)")
        write_not_measured(out)
        raise typer.Exit(0)
    device_name = torch.cuda.get_device_name()
    spec_gbps, copy_gbps = spec_peak_gbps(device_name), measured_copy_gbps()
    rows = [bench_shape(k, n, bits, m) for k, n in LLAMA3_8B_SHAPES for bits in WIDTHS]
    print_table(rows, spec_gbps, copy_gbps)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"measured": True, "device": device_name, "torch": torch.__version__,
                            "spec_peak_gbps": spec_gbps, "copy_gbps": copy_gbps, "rows": rows}, foreign_ok=True)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
