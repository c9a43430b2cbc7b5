"""The profile's per-block experiments as independent Ray tasks (`--workers N` or a Ray address).

Block l's experiment needs only the model, the probe sets and block l's full-precision inputs. Each task loads
the model itself (`model.load_model(model_source)`, checked against the driver's fingerprint), recomputes the
block-0 inputs and the KL references exactly as the serial run does (`profile.prepare_inputs`), runs the blocks
before l, and returns `profile.measure_layer`'s JSON record. Same operations, same order and the driver's torch
thread count, so the records are byte-identical to the serial run's (tested). The extra cost is the prefix
forward each task repeats (about L/2 block passes per task, against ~L/2 for the tail it measures anyway).

Locally `workers=N` starts a Ray cluster of N CPUs (one task per CPU); a string is the address of a running
cluster (`ray://host:10001`, `auto`). Records come back in layer order, so the driver saves the resumable
state after each, as in the serial run.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from tasa_deploy import UsageError


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--workers needs Ray: pip install 'ray>=2.40' (or run without --workers)") from None
    return ray


def _layer_task(model_source: str, dtype_name: str, fingerprint: str, state: dict, probes: dict, layer: int,
                threads: int) -> dict:
    """Runs in a Ray worker: block `layer`'s record, computed from scratch."""
    import torch

    from tasa_deploy.model import decoder_blocks, load_model, model_fingerprint
    from tasa_deploy.profile import advance_block, measure_layer, prepare_inputs

    torch.set_num_threads(threads)
    model = load_model(model_source, getattr(torch, dtype_name)).model
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError(f"{model_source} loaded in a Ray worker is not the driver's model (fingerprint differs)")
    state = {**state, "layers": []}
    batches, hidden, references = prepare_inputs(model, state, probes)
    blocks = decoder_blocks(model)
    for index in range(layer):
        hidden, _ = advance_block(blocks[index], hidden, batches, probes)
    with torch.no_grad():
        record, _ = measure_layer(model, layer, state, probes, batches, hidden, references)
    return record


def measure_layers_on_ray(model_source: str | None, model, state: dict, probes: dict, layers: Iterable[int],
                          workers) -> Iterator[dict]:
    """Yield the records of `layers` in order, each computed by a Ray task."""
    import torch

    from tasa_deploy.model import model_fingerprint

    if not model_source:
        raise UsageError("--workers needs the model as a name or path each worker can load (not an in-memory model)")
    if isinstance(workers, int) and workers < 1:
        raise UsageError(f"--workers must be >= 1 or a Ray address, got {workers}")
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        if isinstance(workers, int):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=workers, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(_layer_task)
        dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
        shared = (model_source, dtype_name, model_fingerprint(model), ray.put({**state, "layers": []}),
                  ray.put(probes))
        pending = [task.remote(*shared, layer, torch.get_num_threads()) for layer in layers]
        for ref in pending:
            yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()
