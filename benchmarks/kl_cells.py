"""KL columns of the quality tables (quality.py on SmolLM2, quality_qwen.py on Qwen): the quantized row's mean
KL divergence from the unquantized model, with its standard error, on WikiText-2 and on each protected task's
eval rows.

WikiText-2 under llama.cpp's protocol (second half of each 512-token chunk): GGUF rows are scored by the real
`llama-perplexity --kl-divergence` against the F16 GGUF of the base; our rows by `eval.kld.kl_on_text`. Task
columns (`<column>_kld`) score the answer (or choice) tokens of the eval rows with `eval.kld.kl_on_rows`, GGUF
rows on their dequantized weights. `fp`, the reference itself, is 0 by definition. The unquantized model is
loaded once per process and kept with its final hidden states (`eval.kld.ReferenceStates`), so each later row
of a table runs only its own forward passes.
"""

from __future__ import annotations

from pathlib import Path

_REFERENCES: dict = {}  # model name -> (LoadedModel, ReferenceStates): one per process


def kl_cells(target: Path | None, model: str, base_gguf: Path | None, text_file: Path, windows: int | None,
             kl_tasks: dict[str, tuple[str, str, int | None]]) -> dict:
    """{wikitext_kld, <column>_kld, ..._se, ..._n} for one row. kl_tasks: column -> (data source, split, rows)."""
    from tasa_deploy.data import load_rows
    from tasa_deploy.eval.kld import ReferenceStates, kl_on_rows, kl_on_text
    from tasa_deploy.exporters.llamacpp import llama_kl_divergence
    from tasa_deploy.model import load_any, load_model

    columns = ("wikitext", *kl_tasks)
    if target is None:
        return {f"{c}_kld": 0.0 for c in columns} | {f"{c}_kld_se": 0.0 for c in columns}
    if model not in _REFERENCES:
        fp = load_model(model)
        _REFERENCES[model] = (fp, ReferenceStates(fp.model))
    fp, reference = _REFERENCES[model]
    is_gguf = target.suffix == ".gguf"
    loaded = load_model(str(target)) if is_gguf else load_any(str(target))
    windows = windows or 10**6
    if is_gguf:
        kl = llama_kl_divergence(target, base_gguf, text_file, ctx=512, chunks=windows)
        cells = {"wikitext_kld": kl["kld"], "wikitext_kld_se": kl["kld_se"], "wikitext_kld_by": "llama-perplexity"}
    else:
        kl = kl_on_text(loaded.model, reference, fp.tokenizer, text_file.read_text(encoding="utf-8"), 512, windows,
                        protocol="llamacpp")
        cells = {"wikitext_kld": kl.kld, "wikitext_kld_se": kl.kld_se, "wikitext_kld_by": "pytorch"}
    for column, (source, role, limit) in kl_tasks.items():
        kl = kl_on_rows(loaded.model, reference, fp.tokenizer, load_rows(source, role, limit))
        cells |= {f"{column}_kld": kl.kld, f"{column}_kld_se": kl.kld_se, f"{column}_kld_n": kl.n}
    return cells
