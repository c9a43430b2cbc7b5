"""The profile on Ray (tasa_deploy.distributed): 2 local workers give a state file byte-identical to the serial run's;
bad worker requests are one-line errors. Skips without Ray."""

import pytest

ray = pytest.importorskip("ray")

from tasa_deploy import UsageError  # noqa: E402
from tasa_deploy.model import load_model  # noqa: E402
from tasa_deploy.profile import measure_profile  # noqa: E402


def test_ray_profile_is_byte_identical_to_the_serial_one(tiny_model_dir, tmp_path, calibration_data):
    paths = {}
    for name, workers in (("serial", None), ("ray", 2)):
        loaded = load_model(str(tiny_model_dir))
        paths[name] = tmp_path / f"{name}.json"
        measure_profile(loaded.model, loaded.tokenizer, objectives=("ppl", "kl:math"), n_probe=4, seq_len=64,
                        partial_path=paths[name], progress=False, workers=workers, model_source=str(tiny_model_dir))
    assert paths["ray"].read_bytes() == paths["serial"].read_bytes()


def test_bad_worker_requests(tiny_model_dir, tmp_path, calibration_data):
    loaded = load_model(str(tiny_model_dir))
    for workers, source, message in ((0, str(tiny_model_dir), "--workers must be >= 1"),
                                     (2, None, "name or path each worker can load")):
        with pytest.raises(UsageError, match=message):
            measure_profile(loaded.model, loaded.tokenizer, objectives=("ppl",), n_probe=2, seq_len=32,
                            partial_path=tmp_path / f"{workers}.json", progress=False, workers=workers,
                            model_source=source)
