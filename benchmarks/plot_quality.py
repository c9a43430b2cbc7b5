"""Reports for the quality table of benchmarks/quality.py: quality.json, a rich table on stdout, quality.md
(markdown table + caption) and quality.png (bits per weight vs task score and vs WikiText-2 perplexity).

Kept apart from quality.py so the figures can be redrawn from a saved quality.json without a model:
`python benchmarks/plot_quality.py benchmarks/results/quality.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tasa_deploy.artifacts import atomic_path, write_json_atomic

COLUMNS = ("name", "bpw", "wikitext_ppl", "wikitext_ppl_llamacpp", "gsm8k", "gsm8k_ll", "arc_easy", "arc_challenge",
           "hellaswag", "piqa", "task_score", "wikitext_kld", "gsm8k_kld", "arc_easy_kld", "arc_challenge_kld",
           "wall_seconds")  # *_kld: KL from the unquantized model (benchmarks/kl_cells.py)


ACCURACY_ITEMS = {"gsm8k": "gsm8k_items", "arc_easy": "mc_items", "arc_challenge": "mc_items",
                  "hellaswag": "mc_items", "piqa": "mc_items"}  # accuracy column -> its item count setting


def with_standard_errors(report: dict) -> dict:
    """Every accuracy gets `<column>_se` = sqrt(p (1 - p) / n) (binomial, n items from the eval settings), and
    task_score (the mean of five independent accuracies) gets sqrt(sum se^2) / 5."""
    ev = report["settings"]["eval"]
    rows = []
    for row in report["rows"]:
        row = dict(row)
        ses = []
        for column, setting in ACCURACY_ITEMS.items():
            p, n = row.get(column), ev.get(setting)
            if isinstance(p, (int, float)) and n:
                row[f"{column}_se"] = (p * (1 - p) / n) ** 0.5
                ses.append(row[f"{column}_se"])
        if row.get("task_score") is not None and len(ses) == len(ACCURACY_ITEMS):
            row["task_score_se"] = sum(se**2 for se in ses) ** 0.5 / len(ses)
        rows.append(row)
    return {**report, "rows": rows}


def caption(report: dict) -> str:
    """What the table measures and how to read it (the provenance of the base weights first)."""
    ev = report["settings"]["eval"]
    return (
        f"Model {report['model']} on {report['machine']['cpus']} CPUs, {report['date']}. "
        "SmolLM2's base weights came from a Q4_1 GGUF, so 3-bit is the informative regime; 4-bit requantization "
        "is lossless only onto that same Q4_1 grid (our Q4_1 packer reproduces the weights exactly) — symmetric "
        "int4 g64 RTN of them still has ~11% relative weight error. bpw: our rows from tasa_deploy.bits over the quantized linears (codes + fp16 "
        "group scales), GGUF rows = stored bits / weights over the file's blk.* linears (SmolLM2's K=576 rows are "
        "not a multiple of 256, so llama-quantize falls back to larger block-32 types for those tensors); "
        "`fp` is the dequantized base counted as f16. tasa-3.0 runs at the cheapest feasible budget (every unit "
        "int3 with fp16 group scales, about 3.2 bpw; see its budget_bits) since 3.0 bpw cannot hold the scales. wikitext_ppl: our standard protocol (non-overlapping "
        f"512-token windows, {ev['wikitext_windows'] or 'all'} windows, PyTorch). wikitext_ppl_llamacpp: "
        "llama.cpp's protocol (second half of each 512 chunk scored, BOS-replaced first token): GGUF rows "
        "measured by the real llama-perplexity, our rows by tasa_deploy.eval.perplexity(protocol='llamacpp') "
        "on the same raw file, so that column compares across all rows. Multiple-choice columns "
        f"({ev['mc_items'] or 'all'} items each) use llama.cpp's rule (mean log-prob per token of each choice past "
        "the choices' common prefix): GGUF rows scored IN llama.cpp by llama-perplexity --multiple-choice, our "
        "rows by its PyTorch replica (per-item agreement with llama.cpp measured at 117/120 on SmolLM2's own GGUF); "
        "lm-eval's acc_norm is in the JSON as <task>_acc_norm. gsm8k = 4-shot greedy exact match on "
        f"{ev['gsm8k_items'] or 'all'} problems; gsm8k_ll = mean per-token log-likelihood of the reference "
        f"solution over {ev['gsm8k_ll_items'] or 'all'} problems, higher is better — both from our PyTorch "
        "evaluator, for GGUF rows on the GGUF's own dequantized weights (quality_qwen.py scores generations "
        "through llama-server instead). "
        "task_score = mean of gsm8k, arc_easy, arc_challenge, hellaswag, piqa. ± is one binomial standard error, "
        "sqrt(p(1-p)/n) over the n items (0 when p is 0 or 1: read those as \"no item right/wrong of n\"); task_score's "
        "is sqrt(sum of the five squared SEs) / 5. Differences under about 2 SE are ties. *_kld: mean KL "
        "divergence from the unquantized model ± its SE (benchmarks/kl_cells.py): wikitext under llama.cpp's "
        "protocol (GGUF rows by llama-perplexity --kl-divergence against the base's F16 GGUF), gsm8k / arc_* on "
        "the answer or choice tokens of the eval rows (GGUF rows on their dequantized weights); n/a in rows "
        "evaluated before the KL columns existed. TASA rows' profile objectives: "
        f"{report['settings']['quant'].get('objective_loss', 'nll')} (kl = KL from the unquantized model on each "
        "objective's scored tokens; nll = their negative log-likelihood)."
        + "".join(f" Unit costs of {', '.join(names)}: {proxy}." for proxy, names in unit_splits(report).items()))


def unit_splits(report: dict) -> dict[str, list[str]]:
    """How the TASA rows split each block's measured delta over its units (recorded per row) -> the rows of each."""
    splits: dict[str, list[str]] = {}
    for row in report["rows"]:
        if row.get("unit_error_proxy"):
            splits.setdefault(row["unit_error_proxy"], []).append(row["name"])
    return splits


def format_cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def cell(row: dict, column: str) -> str:
    """A value, with ± its standard error where the row has one."""
    se = row.get(f"{column}_se")
    if se is not None and row.get(column) is not None:
        digits = 4 if column.endswith("_kld") else 3
        return f"{row[column]:.{digits}f} ± {se:.{digits}f}"
    return format_cell(row.get(column))


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(cell(row, c) for c in COLUMNS) + " |")
    return "\n".join(lines)


def print_rich_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"quality: {report['model']}")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "name" else "right")
    for row in report["rows"]:
        table.add_row(*(cell(row, c) for c in COLUMNS))
    Console(width=240).print(table)


def plot_quality(report: dict, png_path: Path) -> Path:
    """Two panels: bpw vs task_score and bpw vs WikiText-2 ppl (llama.cpp protocol), one labeled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, column, label in ((axes[0], "task_score", "task score (mean accuracy)"),
                                (axes[1], "wikitext_ppl_llamacpp", "WikiText-2 ppl (llama.cpp protocol)")):
        for row in report["rows"]:
            if row.get(column) is None or row.get("bpw") is None:
                continue
            if row["name"] == "fp":  # a reference line: at 16 bpw its point would squash the x axis
                axis.axhline(row[column], linestyle="--", color="gray", label="fp (dequantized base)")
                axis.legend(loc="best", fontsize=7)
                continue
            family = row["name"].split("-")[0].rstrip("0123456789")
            marker = {"fp": "*", "uniform": "s", "tasa": "o", "llamacpp": "^"}.get(family, "x")
            axis.scatter(row["bpw"], row[column], marker=marker, s=40)
            axis.annotate(row["name"], (row["bpw"], row[column]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
        axis.set_xlabel("bits per weight (quantized linears)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1].set_yscale("log")
    fig.suptitle(f"{report['model']}: quality vs size")
    fig.tight_layout()
    with atomic_path(Path(png_path), force=True, foreign_ok=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(png_path)


def write_reports(report: dict, out_dir: Path) -> None:
    """quality.json, quality.md and quality.png under `out_dir`, plus the rich table on stdout."""
    out_dir = Path(out_dir)
    report = with_standard_errors(report)
    write_json_atomic(out_dir / "quality.json", report, foreign_ok=True)
    markdown = f"# Quality table\n\n{markdown_table(report)}\n\n{caption(report)}\n"
    with atomic_path(out_dir / "quality.md", force=True, foreign_ok=True) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    plot_quality(report, out_dir / "quality.png")
    print_rich_table(report)
    print(f"wrote {out_dir / 'quality.json'}, quality.md, quality.png", file=sys.stderr)


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quality.json")
    write_reports(json.loads(source.read_text()), source.parent)
