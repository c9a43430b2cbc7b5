"""Mixed-bit (2/3/4/8) dequant-GEMM for compressed-tensors `pack-quantized` weights (TASA's vLLM target).

reference.py    PyTorch unpack + dequant + matmul (the spec every kernel is tested against)
mixed_gemm.py   Triton split-K GEMV (decode) / tiled GEMM (prefill); imports triton
quant_linear.py QuantLinear nn.Module and replace_linears(model, artifact)
vllm_plugin.py  register(): vLLM general plugin adding our MPLinearKernel for widths vLLM lacks
Submodules are imported on use so that importing this package never pulls in triton or vllm.
"""
