"""`quantize --config recipe.yaml`: every option of a run in one file, and the same file saved in each artifact.

A recipe is a YAML mapping of `pipeline.QuantizeRequest` fields (`calib-samples` or `calib_samples`). The run
writes its own recipe (`recipe_text`: the request as stored in the plan, plus the model) into the artifact as
`recipe.yaml`, so `tasa-deploy quantize --config ARTIFACT/recipe.yaml --out NEW` repeats it exactly. Options
given on the command line override the file. The file is read with `yaml.safe_load` (data only, nothing runs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tasa_deploy import UsageError

HEADER = "# tasa-deploy quantize recipe: `tasa-deploy quantize --config THIS --out DIR` repeats the run\n"
_NOT_RECIPE = ("out", "work_dir", "force", "plan_path")  # where a run writes, not what it does


def recipe_fields() -> dict[str, dataclasses.Field]:
    from tasa_deploy.pipeline import QuantizeRequest

    return {f.name: f for f in dataclasses.fields(QuantizeRequest) if f.name not in _NOT_RECIPE}


def read_recipe(path: Path) -> dict:
    """The recipe's options as QuantizeRequest keyword arguments; one-line errors for a bad file."""
    import yaml

    from tasa_deploy.request import TUPLE_FIELDS
    from tasa_deploy.schema import MAX_JSON_BYTES

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise UsageError(f"--config {path}: larger than {MAX_JSON_BYTES} bytes; a recipe is a short YAML file")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: not valid UTF-8 YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"--config {path}: expected a mapping of quantize options, got {type(obj).__name__}")
    fields = recipe_fields()
    options = {}
    for key, value in obj.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UsageError(f"--config {path}: unknown option '{key}'; known: {', '.join(sorted(fields))}")
        if name in TUPLE_FIELDS and value is not None:
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif isinstance(value, list):
                value = tuple(value)
            else:
                raise UsageError(f"--config {path}: '{key}' must be a list or a comma-separated string")
        options[name] = value
    return options


def recipe_text(request) -> str:
    """The YAML recipe of a request (what `read_recipe` reads back into the same request)."""
    import yaml

    from tasa_deploy.request import request_to_json

    stored = request_to_json(request)
    body = {name: list(v) if isinstance(v, tuple) else v for name, v in stored.items()}
    return HEADER + yaml.safe_dump(body, sort_keys=False)
