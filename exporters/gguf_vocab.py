"""Tokenizer metadata for a GGUF, read from the HF `tokenizer.json` in the artifact directory.

llama.cpp re-implements the tokenizer from GGUF keys (`tokenizer.ggml.*`, see the GGUF spec in ggml's
docs/gguf.md): the model family ("gpt2" = byte-level BPE), every token string by id, each token's type,
the BPE merges, special-token ids, whether to add BOS, and `tokenizer.ggml.pre`, the name of the
pre-tokenizer regex llama.cpp must apply before BPE (llama.cpp `src/llama-vocab.cpp`).

`tokenizer.ggml.pre` cannot be read off tokenizer.json reliably (the HF dir we get from a GGUF, for
instance, has lost SmolLM2's digit-splitting step), so we detect it from the vocabulary, which is stable:
  smollm     49152 tokens with <|endoftext|>, <|im_start|>, <|im_end|> at ids 0, 1, 2 (SmolLM 1/2)
  llama-bpe  a <|begin_of_text|> token (Llama 3)
  qwen2      <|endoftext|> and <|im_start|> in a vocabulary of >= 151643 tokens (Qwen 2 / 2.5)
anything else gets "default" with a warning; `pre=` overrides the detection. SentencePiece (Gemma) vocabs
are not supported yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from tasa_deploy import UsageError
from tasa_deploy.artifacts import read_json


@dataclass(frozen=True)
class GgufVocab:
    """Everything `add_to_writer` puts under tokenizer.ggml.*."""

    tokens: tuple[str, ...]  # by id
    token_types: tuple[int, ...]  # gguf.TokenType values
    pre: str  # llama.cpp pre-tokenizer name
    add_bos: bool
    special: gguf.SpecialVocab  # merges, bos/eos/unk/pad ids, chat template
    warnings: tuple[str, ...] = ()


def detect_pre_tokenizer(tokens: tuple[str, ...]) -> str | None:
    """The llama.cpp pre-tokenizer name for a known vocabulary (see module docstring), else None."""
    if len(tokens) == 49152 and tokens[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        return "smollm"
    known = set(tokens[-512:]) | set(tokens[:16])
    if "<|begin_of_text|>" in known:
        return "llama-bpe"
    if {"<|endoftext|>", "<|im_start|>"} <= known and len(tokens) >= 151643:
        return "qwen2"
    return None


def _token_table(tokenizer: dict, n_vocab: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Token strings and types by id; ids missing from tokenizer.json become [PAD{id}] (UNUSED)."""
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    size = max(n_vocab, max(by_id) + 1)
    tokens = tuple(by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))[0] for i in range(size))
    types = tuple(int(by_id.get(i, ("", gguf.TokenType.UNUSED))[1]) for i in range(size))
    return tokens, types


def _adds_bos(model_dir: Path, tokenizer: dict) -> bool:
    """tokenizer_config's add_bos_token if set, else whether the post-processor template starts with a token."""
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        flag = read_json(config_path, "tokenizer config", allow_nonfinite=True).get("add_bos_token")
        if flag is not None:
            return bool(flag)
    single = (tokenizer.get("post_processor") or {}).get("single") or []
    return bool(single) and "SpecialToken" in single[0]


def read_vocab(model_dir: Path, n_vocab: int, pre: str | None = None) -> GgufVocab:
    """Build the GGUF tokenizer metadata from `model_dir`/tokenizer.json (byte-level BPE only)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{path} not found; the artifact directory needs the HF tokenizer files")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    if tokenizer.get("model", {}).get("type") != "BPE" or tokenizer["model"].get("byte_fallback"):
        raise UsageError(f"{path}: only byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2) can be exported "
                         "to GGUF so far")
    tokens, types = _token_table(tokenizer, n_vocab)
    warnings = []
    detected = detect_pre_tokenizer(tokens)
    if pre is None and detected is None:
        warnings.append("unknown vocabulary: tokenizer.ggml.pre set to 'default' (GPT-2 regex); "
                        "pass the right pre-tokenizer name if llama.cpp tokenizes differently")
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise UsageError(f"{path} has no BPE merges; cannot build a GGUF tokenizer")
    add_bos = special.add_special_token.get("bos", _adds_bos(Path(model_dir), tokenizer))
    return GgufVocab(tokens, types, pre or detected or "default", bool(add_bos), special, tuple(warnings))


def add_to_writer(vocab: GgufVocab, writer: gguf.GGUFWriter) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    if "bos" not in vocab.special.add_special_token:  # else SpecialVocab writes it (keys must be unique)
        writer.add_add_bos_token(vocab.add_bos)
    vocab.special.add_to_gguf(writer, quiet=True)
