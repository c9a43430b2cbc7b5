"""What one `tasa-deploy quantize` run asks for: `QuantizeRequest`, validated when it is made (a bad value is a
one-line UsageError before any model loads), and its JSON form stored in every plan (`request_to_json`).

The pipeline (`pipeline.run_quantize`), the Python API, recipes and the GGUF re-quantization all build one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tasa_deploy import UsageError
from tasa_deploy.device import resolve_device, resolve_dtype
from tasa_deploy.objectives import KL_PREFIX
from tasa_deploy.plan import candidate_values, check_budget_args, default_candidates
from tasa_deploy.quant.spec import INT_GROUP_SIZES, QuantSpec
from tasa_deploy.sizes import parse_size
from tasa_deploy.tasks import TASKS, get_task, register_task_data

OBJECTIVE_LOSSES = ("kl", "nll")


@dataclass(frozen=True)
class QuantizeRequest:
    """Everything `tasa-deploy quantize` was asked to do (validated on construction)."""

    model: str = "smollm2-135m"
    out: Path = Path("out/smollm2-tasa")
    bits: float = 3.5  # average-bit budget (TASA) or the uniform width
    size: str | None = None  # whole-file budget of the --target export ("120MB", "4GB"; TASA): replaces bits
    max_slowdown: float | None = None  # GGUF TASA: decode no slower than this x llama.cpp's preset of the same
    #   size (tasa_deploy.speed); None: 1.0 when llama.cpp's tools are built, else speed-blind; 0: speed-blind
    speed_reference: str | None = None  # llama.cpp preset to be no slower than (None: the budget's nominal match)
    method: str = "tasa"  # "tasa" | "uniform"
    target: str = "vllm"  # "vllm" (int g128 grid) | "gguf" (GGML grids)
    tasks: tuple[str, ...] = ("gsm8k", "arc")
    task_data: tuple[str, ...] = ()  # "NAME=PATH" user tasks (tasa_deploy.tasks); NAME may then be in tasks
    general: str = "lambada"
    candidates: tuple[int | str, ...] | None = None  # widths, or GGML type names (--target gguf) such as "q4_k";
    #   None: plan.default_candidates(target) (3,4,8 vLLM; 3,4,5,6,8 GGUF)
    beta: float = 0.5  # MOA weight on reasoning objectives
    group_size: int | None = None  # None = largest of 128/64/32 dividing each K
    symmetric: bool = True
    quantizer: str = "gptq"  # "gptq" | "rtn"
    alpha: float | None = None  # force the general-data share (skips the mixture search)
    calib_samples: int = 32  # x seq_len tokens for GPTQ (CPU-friendly default; 128 x 2048 on a GPU box)
    seq_len: int = 512
    probe_samples: int = 16
    probe_seq_len: int = 128
    objective_loss: str = "kl"  # how the profile scores prose and tasks: "kl" from the unquantized model, or "nll"
    probe_snr: float | None = None  # double the probe rows until every objective's signal-to-noise reaches this
    max_probe_samples: int = 256
    mix_samples: int = 8
    mix_draws: int = 1  # repeat the mixture search on this many data draws and average the scores
    true_sequential: bool = False
    seed: int = 0
    act_order: bool = False
    work_dir: Path | None = None
    plan_path: Path | None = None  # quantize with this tasa_plan.json instead of running mix/profile/plan
    force: bool = False
    device: str | None = None  # cpu | cuda | cuda:N (None: cuda when available); blocks onload one at a time
    dtype: str | None = None  # bf16 | fp16 | fp32 weights (None: bf16 on CUDA, fp32 on the CPU)
    workers: int | str | None = None  # the profile's per-block experiments on Ray: N local workers or an address

    def __post_init__(self) -> None:
        if self.method not in ("tasa", "uniform"):
            raise UsageError(f"--method must be tasa or uniform, got {self.method}")
        if self.method == "uniform" and (self.bits != int(self.bits) or not 2 <= self.bits <= 8):
            raise UsageError(f"uniform quantization needs an integer --bits in 2..8, got {self.bits}")
        for spec in self.task_data:  # reads and validates the user's files before any model is loaded
            register_task_data(spec)
        if not self.tasks:
            raise UsageError("--tasks is empty; give at least one of: " + ", ".join(TASKS))
        for task in self.tasks:
            get_task(task)
        self._check_candidates()
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.objective_loss not in OBJECTIVE_LOSSES:
            raise UsageError(f"--objective-loss must be one of {', '.join(OBJECTIVE_LOSSES)}, got {self.objective_loss}")
        if self.probe_snr is not None and not (math.isfinite(self.probe_snr) and self.probe_snr > 0):
            raise UsageError(f"--probe-snr must be a number > 0, got {self.probe_snr}")
        if self.max_probe_samples < self.probe_samples:
            raise UsageError(f"--max-probe-samples ({self.max_probe_samples}) is below --probe-samples "
                             f"({self.probe_samples})")
        if self.probe_samples < 2:
            raise UsageError(f"--probe-samples must be >= 2 (a standard error needs two rows), got {self.probe_samples}")
        if self.quantizer not in ("gptq", "rtn"):
            raise UsageError(f"--quantizer must be gptq or rtn, got {self.quantizer}")
        check_budget_args(self.bits, self.beta, self.target)
        if self.max_slowdown is not None and not (math.isfinite(self.max_slowdown) and self.max_slowdown >= 0):
            raise UsageError(f"--max-slowdown must be a number >= 0 (0: speed-blind), got {self.max_slowdown}")
        if self.speed_reference is not None:
            from tasa_deploy.speed import PRESETS

            if self.speed_reference not in PRESETS:
                raise UsageError(f"--speed-reference must be one of {', '.join(PRESETS)}, got '{self.speed_reference}'")
        if self.size is not None:
            parse_size(self.size)
            if self.method != "tasa" or self.plan_path is not None:
                raise UsageError("--size budgets the plan TASA allocates; with --method uniform or --plan the widths "
                                 "are fixed (use --dry-run to see the file size)")
        if self.method == "tasa" and self.plan_path is None and self.size is None \
                and self.bits < min(self.widths):
            raise UsageError(f"--bits {self.bits} is below the narrowest candidate width {min(self.widths)}: "
                             "no plan can meet it; raise --bits or add a narrower --candidates width")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise UsageError(f"--alpha must be a number in [0, 1], got {self.alpha}")
        for name in ("calib_samples", "seq_len", "probe_samples", "probe_seq_len", "mix_samples", "mix_draws"):
            if not 1 <= getattr(self, name) <= 1 << 20:
                raise UsageError(f"--{name.replace('_', '-')} must be in 1..{1 << 20}, got {getattr(self, name)}")
        if not 0 <= self.seed < 1 << 32:
            raise UsageError(f"--seed must be in 0..{(1 << 32) - 1}, got {self.seed}")
        resolve_dtype(self.dtype, resolve_device(self.device))  # one-line errors before any work
        if isinstance(self.workers, int) and self.workers < 1:
            raise UsageError(f"--workers must be >= 1 or a Ray address, got {self.workers}")
        if self.group_size is not None and self.group_size not in (*INT_GROUP_SIZES, -1):
            raise UsageError(f"group size must be one of {', '.join(map(str, INT_GROUP_SIZES))} or -1 "
                             f"(one scale per row), got {self.group_size}")

    def _check_candidates(self) -> None:
        if self.candidates is None:
            return
        object.__setattr__(self, "candidates", candidate_values(self.candidates))  # a recipe may give "3"
        names = [c for c in self.candidates if isinstance(c, str)]
        if not self.candidates or any(not 2 <= c <= 8 for c in self.candidates if not isinstance(c, str)):
            raise UsageError(f"candidate widths must be in 2..8, got {self.candidates}")
        if names and self.target != "gguf":
            raise UsageError(f"GGML type names in --candidates ({', '.join(names)}) need --target gguf")
        for name in names:
            QuantSpec.for_ggml(name)  # an unknown type is a UsageError listing the known ones

    @property
    def plan_candidates(self) -> tuple[int | str, ...]:
        """What the allocator may pick per unit: --candidates (widths or GGML types), else the target's default."""
        return tuple(self.candidates) if self.candidates is not None else default_candidates(self.target)

    @property
    def widths(self) -> tuple[int, ...]:
        """The bit widths of plan_candidates (a GGML type counts at its nominal width)."""
        return tuple(QuantSpec.for_ggml(c).bits if isinstance(c, str) else c for c in self.plan_candidates)

    @property
    def task_sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for t in self.tasks for s in get_task(t).sources))

    @property
    def objectives(self) -> tuple[str, ...]:
        """General prose and each task's objective: every task has one, so a plan is never silently ppl-only.
        objective_loss "kl" (default) scores each by KL divergence from the unquantized model on its scored
        tokens ("kl:ppl", "kl:math"): on SmolLM2 at 48 probe rows its block deltas are 4x (math) to 19x (arc)
        more standard errors from zero than the NLL's (benchmarks/results/profile_noise)."""
        prefix = KL_PREFIX if self.objective_loss == "kl" else ""
        return tuple(dict.fromkeys(prefix + name for name in ("ppl", *(get_task(t).objective for t in self.tasks))))

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Local paths this request reads: an output must not overlap any of them."""
        paths = [self.plan_path, Path(self.model).expanduser()]
        return tuple(p for p in paths if p is not None and p.exists())

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or default_work_dir(self.out)


def default_work_dir(out: Path) -> Path:
    """Where a run keeps its stage artifacts unless told otherwise: OUT.work beside the output."""
    return Path(out).with_name(Path(out).name + ".work")


TUPLE_FIELDS = tuple(f.name for f in fields(QuantizeRequest) if str(f.type).startswith("tuple["))  # JSON lists -> tuples


def request_to_json(request: QuantizeRequest) -> dict:
    """The request as stored in the plan: output locations, the device (float rounding only) and the Ray
    workers (byte-identical results) left out, so identical runs give identical files."""
    kept = {k: v for k, v in asdict(request).items()
            if k not in ("out", "work_dir", "force", "plan_path", "device", "workers")}
    for name, default in (("dtype", None), ("mix_draws", 1), ("size", None), ("max_slowdown", None),
                          ("speed_reference", None)):  # defaults leave stored plans as they were
        if kept[name] == default:
            del kept[name]
    return kept
