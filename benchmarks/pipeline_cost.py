"""Cost of the TASA pipeline (arXiv 2607.00908) on one machine -> benchmarks/results/pipeline_cost.json.

1. Stages: one full `run_quantize` (mix -> profile -> plan -> GPTQ -> save) in a fresh work dir; wall time per
   stage is the `stage_seconds` the pipeline returns, peak RSS per stage comes from a thread sampling
   /proc/self/statm every 50 ms, with stage windows laid end to end backwards from the run's end (the
   pipeline times its stages back to back; the few ms between them fall into the neighbouring window).
2. Scaling of the sensitivity profile (the stage that grows with depth and objectives): `measure_profile`
   on the model truncated to 4, 8, 16, 30 layers (model.model.layers and config.num_hidden_layers sliced)
   with all 3 objectives, and on a fixed depth with 1, 2, 3 objectives (ppl, +math, +arc). Each scaling
   table gets a least-squares line (seconds = a + b * x) and its R^2. Cost model, from profile.py: per layer,
   RTN-quantize its block and rerun the tail blocks + head over the probe tokens, so block passes grow as
   L(L+1)/2 but the head (49152 x 576 for SmolLM2, ~8 blocks' FLOPs) is paid once per layer; the
   objectives add probe tokens, so cost is linear in their number.

Usage: python benchmarks/pipeline_cost.py [--model smollm2-135m] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main  # noqa: E402
from tasa_deploy import UsageError  # noqa: E402
from tasa_deploy.artifacts import write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "pipeline_cost.json"
OBJECTIVE_SETS = (("ppl",), ("ppl", "math"), ("ppl", "math", "arc"))
FULL = {"layers": (4, 8, 16, 30), "objective_layers": 8, "n_probe": 16, "probe_seq_len": 128,
        "quantize": {"calib_samples": 32, "seq_len": 512, "probe_samples": 16, "mix_samples": 8}}
QUICK = {"layers": (2, 4, 8), "objective_layers": 4, "n_probe": 2, "probe_seq_len": 64,
         "quantize": {"calib_samples": 2, "seq_len": 64, "probe_samples": 2, "mix_samples": 2}}
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 1024**2


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


class RssSampler:
    """Background thread recording (perf_counter, RSS bytes) every `interval` seconds while active."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), current_rss_bytes()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), current_rss_bytes()))

    def peak_between(self, start: float, end: float) -> int:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return max(inside) if inside else max(rss for t, rss in self.samples if t >= start)


def stage_windows(stage_seconds: dict[str, float], end: float) -> dict[str, tuple[float, float]]:
    """(start, end) per stage, laid back to back in the pipeline's order ending at `end`."""
    windows, cursor = {}, end
    for name, seconds in reversed(list(stage_seconds.items())):
        windows[name] = (cursor - seconds, cursor)
        cursor -= seconds
    return dict(reversed(list(windows.items())))


def measure_stages(model: str, quantize_settings: dict, work: Path) -> list[dict]:
    """One fresh TASA quantize; per stage: seconds (from the pipeline) and peak RSS in its window."""
    from tasa_deploy.pipeline import QuantizeRequest, run_quantize

    request = QuantizeRequest(model=model, out=work / "artifact", bits=3.5, work_dir=work / "work",
                              **quantize_settings)
    with RssSampler() as sampler:
        _, summary = run_quantize(request, log=lambda m: print(f"  {m}", file=sys.stderr))
        end = time.perf_counter()
    windows = stage_windows(summary["stage_seconds"], end)
    return [{"stage": name, "seconds": summary["stage_seconds"][name],
             "peak_rss_mib": round(sampler.peak_between(*window) / MIB, 1)} for name, window in windows.items()]


@contextlib.contextmanager
def truncated(model, n_layers: int):
    """The model with only its first `n_layers` decoder blocks (restored on exit)."""
    import torch.nn as nn

    full_layers, full_count = model.model.layers, model.config.num_hidden_layers
    if not 1 <= n_layers <= len(full_layers):
        raise UsageError(f"cannot truncate a {len(full_layers)}-layer model to {n_layers} layers")
    full_types = getattr(model.config, "layer_types", None)
    model.model.layers = nn.ModuleList(list(full_layers)[:n_layers])
    model.config.num_hidden_layers = n_layers
    if full_types is not None:
        model.config.layer_types = full_types[:n_layers]
    try:
        yield model
    finally:
        model.model.layers, model.config.num_hidden_layers = full_layers, full_count
        if full_types is not None:
            model.config.layer_types = full_types


def time_profile(model, tokenizer, probes: dict, n_layers: int, work: Path, config: dict) -> dict:
    """Seconds and peak RSS of one fresh `measure_profile` on the first `n_layers` blocks."""
    from tasa_deploy.profile import measure_profile

    objectives = tuple(probes)
    partial = Path(tempfile.mkdtemp(dir=work)) / "profile.partial.json"  # fresh: nothing to resume from
    with truncated(model, n_layers), RssSampler() as sampler:
        start = time.perf_counter()
        measure_profile(model, tokenizer, objectives=objectives, n_probe=config["n_probe"],
                        seq_len=config["probe_seq_len"], partial_path=partial, progress=False, probes=probes)
        seconds = time.perf_counter() - start
    return {"layers": n_layers, "objectives": len(objectives), "objective_names": list(objectives),
            "probe_tokens": sum(p.n_tokens for p in probes.values()), "seconds": round(seconds, 2),
            "peak_rss_mib": round(sampler.peak_between(start, start + seconds) / MIB, 1)}


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares seconds = intercept + slope * x, with R^2 (1.0 when the points are exactly linear)."""
    n = len(xs)
    if n < 2:
        return {"slope": None, "intercept": None, "r2": None}
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    return {"slope": slope, "intercept": intercept, "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


def quadratic_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares seconds = c0 + c1 * x + c2 * x^2 with R^2: the profile's cost model in depth L (tail
    block passes grow as L(L+1)/2, head passes as L), so depth scaling is judged against this, not a line."""
    import numpy as np

    if len(xs) < 3:
        return {"coefficients": None, "r2": None}
    coefficients = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 2)[::-1]  # c0, c1, c2
    predicted = np.polyval(coefficients[::-1], np.asarray(xs, float))
    ss_res = float(((np.asarray(ys) - predicted) ** 2).sum())
    ss_tot = float(((np.asarray(ys) - np.mean(ys)) ** 2).sum())
    return {"coefficients": [float(c) for c in coefficients], "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


def scaling_fits(by_layers: list[dict], by_objectives: list[dict]) -> dict:
    layers, layer_seconds = [r["layers"] for r in by_layers], [r["seconds"] for r in by_layers]
    return {"fit_seconds_vs_layers": linear_fit(layers, layer_seconds),
            "fit_seconds_vs_layers_quadratic": quadratic_fit(layers, layer_seconds),
            "fit_seconds_vs_objectives": linear_fit([r["objectives"] for r in by_objectives],
                                                    [r["seconds"] for r in by_objectives])}


def measure_scaling(model_name: str, config: dict, work: Path) -> dict:
    """Profile cost over depth (all objectives) and over the number of objectives (fixed depth)."""
    from tasa_deploy.model import load_model
    from tasa_deploy.objectives import load_probe_set

    loaded = load_model(model_name)
    n_blocks = len(loaded.model.model.layers)
    probes = {name: load_probe_set(name, loaded.tokenizer, config["n_probe"], config["probe_seq_len"])
              for name in OBJECTIVE_SETS[-1]}
    depths = sorted({min(n, n_blocks) for n in config["layers"]})
    by_layers = [time_profile(loaded.model, loaded.tokenizer, probes, n, work, config) for n in depths]
    fixed = min(config["objective_layers"], n_blocks)
    by_objectives = [time_profile(loaded.model, loaded.tokenizer, {k: probes[k] for k in names}, fixed, work, config)
                     for names in OBJECTIVE_SETS]
    return {"by_layers": by_layers, "by_objectives": by_objectives, **scaling_fits(by_layers, by_objectives)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="tiny calibration / probe sizes, depths 2, 4, 8")
    parser.add_argument("--skip-stages", action="store_true", help="only the profile scaling tables")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="tasa-cost-") as tmp:
        work = Path(tmp)
        stages = [] if args.skip_stages else measure_stages(args.model, config["quantize"], work)
        scaling = measure_scaling(args.model, config, work)
    report = {"model": args.model, "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "settings": {**config, "quick": args.quick}, "stages": stages,
              "total_stage_seconds": round(sum(s["seconds"] for s in stages), 2),
              "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "profile_scaling": scaling}
    write_json_atomic(args.out, report, foreign_ok=True)
    print_summary(report)
    return report


def print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, rows in (("stages", report["stages"]), ("profile vs layers", report["profile_scaling"]["by_layers"]),
                        ("profile vs objectives", report["profile_scaling"]["by_objectives"])):
        if not rows:
            continue
        table = Table(title=title)
        columns = [c for c in rows[0] if c != "objective_names"]
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(row[c]) for c in columns))
        console.print(table)
    for key in ("fit_seconds_vs_layers", "fit_seconds_vs_objectives"):
        fit = report["profile_scaling"][key]
        if fit["slope"] is not None:
            console.print(f"{key}: {fit['intercept']:.2f} + {fit['slope']:.2f} * x s (R^2 {fit['r2']:.4f})")
    quadratic = report["profile_scaling"].get("fit_seconds_vs_layers_quadratic", {})
    if quadratic.get("coefficients"):
        c0, c1, c2 = quadratic["coefficients"]
        console.print(f"fit_seconds_vs_layers_quadratic: {c0:.2f} + {c1:.3f} * L + {c2:.4f} * L^2 s "
                      f"(R^2 {quadratic['r2']:.4f})")


if __name__ == "__main__":
    run_main(main)
