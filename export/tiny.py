"""Random-weight Mixtral checkpoints in Hugging Face's exact file layout, for tests and demos.

The tokenizer is Mixtral's real SentencePiece model (shipped by mistral-common), so prompts
tokenize exactly as they would for Mixtral-8x7B. A checkpoint with a smaller vocabulary gets no
tokenizer (its ids would have no embedding row) and takes token ids only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from mixtral_trt.config import MixtralConfig
from mixtral_trt.fsutil import atomic_dir

from .checkpoint import expected_tensors

# The built-in default: fixed shape and seed. Bump the version when either changes.
TINY_VERSION = 1
TINY_SEED = 0
TINY_CONFIG = MixtralConfig(
    vocab_size=32000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=8,
    num_experts_per_tok=2,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    max_position_embeddings=4096,
    torch_dtype="float32",
)

TOKENIZER_SIZE = 32000  # tokens in Mixtral's tokenizer.model

# Real-text prompts (tokenized with Mixtral's tokenizer) for accuracy checks and demos.
SAMPLE_PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "To install the package, run pip install and then import it in your script.",
    "The quick brown fox jumps over the lazy dog while the cat watches quietly.",
    "In 1969, astronauts landed on the Moon for the first time in human history.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Water boils at one hundred degrees Celsius at sea level pressure.",
]


def tiny_config(**overrides) -> MixtralConfig:
    """The default tiny config with some fields replaced (head_dim follows hidden/heads unless given)."""
    fields = dataclasses.asdict(TINY_CONFIG)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if "head_dim" not in overrides or overrides["head_dim"] is None:
        if fields["num_attention_heads"] > 0 and fields["hidden_size"] % fields["num_attention_heads"] == 0:
            fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
        else:
            fields["head_dim"] = 0  # refused by validation with the hidden/heads message below
    if fields["head_dim"] == 0:
        from mixtral_trt.config import ConfigError

        raise ConfigError(
            f"hidden_size={fields['hidden_size']} is not divisible by num_attention_heads="
            f"{fields['num_attention_heads']}; choose a hidden size that is a multiple of the head count"
        )
    return MixtralConfig(**fields)


def tokenizer_source() -> Path:
    """Mixtral's SentencePiece model as shipped in mistral-common (32000 tokens)."""
    try:
        import mistral_common
    except ImportError:
        raise RuntimeError("mistral-common is required for the tiny model's tokenizer: pip install mistral-common")
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise RuntimeError(f"mistral-common {mistral_common.__version__} does not ship {path.name}")
    return path


def random_weights(cfg: MixtralConfig, seed: int):
    """Random tensors for every checkpoint entry, scaled so logits are O(1) and not degenerate."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, cfg.torch_dtype)
    out = {}
    for name, shape in expected_tensors(cfg).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        out[name] = t.to(dtype).contiguous()
    return out


def write_tiny(out_dir: str | Path, cfg: MixtralConfig = TINY_CONFIG, seed: int = TINY_SEED) -> Path:
    """Write config.json, model.safetensors and (with a vocabulary of at least Mixtral's 32000 tokens)
    tokenizer.model into ``out_dir`` atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is a file; choose a new directory for the tiny checkpoint")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory for the tiny checkpoint")
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
        save_file(random_weights(cfg, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if cfg.vocab_size >= TOKENIZER_SIZE:
            shutil.copyfile(tokenizer_source(), tmp / "tokenizer.model")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}) + "\n"
        )
    return out_dir


def cache_dir() -> Path:
    """Where ``--model tiny`` lives: $MIXTRAL_TRT_CACHE, else $XDG_CACHE_HOME/mixtral-trt, else ~/.cache."""
    if os.environ.get("MIXTRAL_TRT_CACHE"):
        return Path(os.environ["MIXTRAL_TRT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixtral-trt"


def default_tiny() -> Path:
    """The built-in default tiny checkpoint, created on first use."""
    path = cache_dir() / f"tiny-v{TINY_VERSION}"
    if not (path / "config.json").is_file():
        if path.exists():
            shutil.rmtree(path)
        write_tiny(path)
    return path


def resolve_model(spec: str | Path) -> Path:
    """``tiny`` means the built-in default; anything else is a checkpoint directory."""
    return default_tiny() if str(spec) == "tiny" else Path(spec)
