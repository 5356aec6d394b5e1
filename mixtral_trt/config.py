"""The frozen Mixtral model configuration, read once from ``config.json`` and validated."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes a model we cannot compile."""


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Everything the decoder needs; field names follow Hugging Face's config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _check_dims(self)

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> MixtralConfig:
        """Build from a manifest's ``config`` entry (already our own field names), each field's type checked."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source} must be an object of config fields, found {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown config fields {unknown}; expected only {sorted(fields)}")
        missing = sorted(n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"{source}: required config fields {missing} are missing")
        for name, value in raw.items():
            _check_field_type(name, value, fields[name].type, source)
        if raw.get("torch_dtype", "bfloat16") not in SUPPORTED_DTYPES:
            raise ConfigError(f"{source}: torch_dtype={raw['torch_dtype']!r}; expected one of {SUPPORTED_DTYPES}")
        return cls(**raw)

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> MixtralConfig:
        """Build from a Hugging Face ``config.json`` dictionary, refusing what we do not support."""
        _check_architecture(raw, source)
        _check_aliases(raw, source)
        get = _Getter(raw, source)
        hidden = get.int("hidden_size")
        heads = get.int("num_attention_heads")
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if heads > 0 and hidden % heads != 0:
                raise ConfigError(
                    f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                    "and no head_dim is given; set head_dim or fix the head count"
                )
            head_dim = hidden // heads if heads > 0 else 0
        window = raw.get("sliding_window")
        if window not in (None, 0) and _as_int(window, "sliding_window", source) < get.int("max_position_embeddings"):
            raise ConfigError(
                f"{source}: sliding_window={window} is not supported "
                "(Mixtral-8x7B uses full attention: sliding_window null)"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported; expected 'silu'")
        return cls(
            vocab_size=get.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get.int("intermediate_size"),
            num_hidden_layers=get.int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get.int("num_key_value_heads", default=heads),
            head_dim=_as_int(head_dim, "head_dim", source),
            num_local_experts=get.int(_experts_field(raw)),
            num_experts_per_tok=get.int("num_experts_per_tok"),
            rms_norm_eps=get.float("rms_norm_eps"),
            rope_theta=_rope_theta(raw, source),
            max_position_embeddings=get.int("max_position_embeddings"),
            tie_word_embeddings=_as_bool(raw.get("tie_word_embeddings"), "tie_word_embeddings", source),
            bos_token_id=_optional_token(raw.get("bos_token_id", 1), "bos_token_id", source),
            eos_token_id=_optional_token(raw.get("eos_token_id", 2), "eos_token_id", source),
            torch_dtype=_dtype(raw, source),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` content for this configuration."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
            "hidden_act": "silu",
            "sliding_window": None,
            "attention_dropout": 0.0,
            "router_jitter_noise": 0.0,
        }


def load_config(model_dir: str | Path) -> MixtralConfig:
    """Read and validate ``MODEL_DIR/config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a Hugging Face Mixtral checkpoint directory has a config.json")
    raw = _json_object(path)
    return MixtralConfig.from_hf(_with_generation_config(raw, path), source=str(path))


def _json_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    return raw


def _with_generation_config(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """config.json with the bos/eos ids of generation_config.json (which transformers' generate
    uses) filled in; the two files naming different ids is refused, not resolved."""
    gen_path = path.with_name("generation_config.json")
    if not gen_path.is_file():
        return raw
    gen = _json_object(gen_path)
    merged = dict(raw)
    for name in ("bos_token_id", "eos_token_id"):
        ours, theirs = raw.get(name), gen.get(name)
        if theirs is None:
            continue
        if ours is not None and _token_ids(ours) != _token_ids(theirs):
            raise ConfigError(
                f"{path} has {name}={ours!r} but {gen_path} has {name}={theirs!r}; transformers generates with the "
                f"second, the config describes the first. Make the two files agree"
            )
        merged[name] = theirs
    return merged


def _token_ids(value: Any) -> list:
    return list(dict.fromkeys(value)) if isinstance(value, list) else [value]


# Fields a config.json may spell two ways; transformers 5 reads the second of each pair first.
_ALIASES = (("num_local_experts", "num_experts"), ("torch_dtype", "dtype"))


def _experts_field(raw: dict[str, Any]) -> str:
    """``num_experts`` (transformers' alias) when it alone is given."""
    alone = raw.get("num_local_experts") is None and raw.get("num_experts") is not None
    return "num_experts" if alone else "num_local_experts"


def _check_aliases(raw: dict[str, Any], source: str) -> None:
    for ours, other in _ALIASES:
        if raw.get(ours) is not None and raw.get(other) is not None and raw[ours] != raw[other]:
            raise ConfigError(
                f"{source}: {ours}={raw[ours]!r} and {other}={raw[other]!r} name the same setting with different "
                f"values (transformers reads {other}); remove one or make them equal"
            )


class _Getter:
    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def _value(self, name: str, default: Any) -> Any:
        if name in self.raw and self.raw[name] is not None:
            return self.raw[name]
        if default is not None:
            return default
        raise ConfigError(f"{self.source}: required field {name!r} is missing")

    def int(self, name: str, default: int | None = None) -> int:
        return _as_int(self._value(name, default), name, self.source)

    def float(self, name: str) -> float:
        value = self._value(name, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise ConfigError(f"{self.source}: field {name!r} must be a finite number, found {value!r}")
        return float(value)


# The annotations of MixtralConfig's fields (strings: postponed evaluation) and what each admits.
_FIELD_TYPES = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a finite number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
    "int | None": ((int, type(None)), "an integer or null"),
}


def _check_field_type(name: str, value: Any, annotation: str, source: str) -> None:
    types, expected = _FIELD_TYPES[annotation]
    bad = isinstance(value, bool) and bool not in types  # JSON true is not the integer 1 here
    if bad or not isinstance(value, types) or (annotation == "float" and not _finite(value)):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"{source}: field {name!r} must be {expected}, found {shown}")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _as_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: field {name!r} must be an integer, found {value!r}")
    return value


def _as_bool(value: Any, name: str, source: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):  # bool("false") is True: a string here would flip the setting
        raise ConfigError(f"{source}: field {name!r} must be true or false, found {value!r}")
    return value


def _optional_token(value: Any, name: str, source: str) -> int | None:
    if isinstance(value, list):
        ids = list(dict.fromkeys(value))
        if len(ids) > 1:  # transformers stops on any listed id; our runtimes stop on one
            raise ConfigError(
                f"{source}: {name}={value!r} lists {len(ids)} different ids; mixtral-trt takes one. Set {name} to "
                f"the single id to use (in config.json and generation_config.json)"
            )
        value = ids[0] if ids else None
    return None if value is None else _as_int(value, name, source)


def _check_architecture(raw: dict[str, Any], source: str) -> None:
    archs = raw.get("architectures")
    model_type = raw.get("model_type")
    if archs is None and model_type is None:
        raise ConfigError(f"{source}: required field 'architectures' is missing (expected ['MixtralForCausalLM'])")
    if archs is not None and (not isinstance(archs, list) or not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise ConfigError(
            f"{source}: unsupported architecture architectures={archs!r}; "
            f"only {list(SUPPORTED_ARCHITECTURES)} can be compiled"
        )
    if model_type is not None and model_type != "mixtral":
        raise ConfigError(f"{source}: unsupported model_type={model_type!r}; expected 'mixtral'")


def _rope_params(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The RoPE settings from ``rope_scaling`` and/or ``rope_parameters`` (transformers 5 reads the first
    when both are given); two objects that disagree on any setting are refused."""
    found = {}
    for key in ("rope_scaling", "rope_parameters"):
        params = raw.get(key) or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: field {key!r} must be an object with a 'rope_type', found {params!r}")
        params = dict(params)
        if "type" in params:
            params.setdefault("rope_type", params.pop("type"))
        found[key] = params
    a, b = found["rope_scaling"], found["rope_parameters"]
    for name in sorted(set(a) & set(b)):
        if a[name] != b[name]:
            raise ConfigError(
                f"{source}: rope_scaling.{name}={a[name]!r} but rope_parameters.{name}={b[name]!r}; transformers "
                "reads rope_scaling. Keep one of the two objects, or make them agree"
            )
    return {**b, **a}


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    params = _rope_params(raw, source)
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"{source}: rope_type={rope_type!r} is not supported; expected 'default' (plain RoPE)")
    top, inner = raw.get("rope_theta"), params.get("rope_theta")
    if top is not None and inner is not None and top != inner:
        raise ConfigError(
            f"{source}: rope_theta={top!r} but the RoPE object gives rope_theta={inner!r}; transformers uses the "
            "second, so the two would give different position encodings. Remove one or make them equal"
        )
    theta = inner if inner is not None else top
    if theta is None:
        raise ConfigError(f"{source}: required field 'rope_theta' is missing (Mixtral uses 1000000.0)")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not _finite(theta) or theta <= 0:
        raise ConfigError(f"{source}: field 'rope_theta' must be a positive finite number, found {theta!r}")
    return float(theta)


def _dtype(raw: dict[str, Any], source: str) -> str:
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"{source}: torch_dtype={dtype!r} is not supported; expected one of {SUPPORTED_DTYPES}")
    return dtype


def _check_dims(c: MixtralConfig) -> None:
    positive = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
    )  # fmt: skip
    for name in positive:
        value = getattr(c, name)
        if value <= 0:
            raise ConfigError(f"config field {name}={value} must be > 0")
    if c.num_attention_heads % c.num_key_value_heads != 0:
        raise ConfigError(
            f"config field num_key_value_heads={c.num_key_value_heads} must divide "
            f"num_attention_heads={c.num_attention_heads} (grouped-query attention)"
        )
    if c.head_dim % 2 != 0:
        raise ConfigError(f"config field head_dim={c.head_dim} must be even (rotary embedding rotates pairs)")
    if c.num_experts_per_tok > c.num_local_experts:
        raise ConfigError(
            f"config field num_experts_per_tok={c.num_experts_per_tok} must be <= "
            f"num_local_experts={c.num_local_experts}"
        )
    for name in ("rms_norm_eps", "rope_theta"):  # written so that NaN fails too
        if not (_finite(getattr(c, name)) and getattr(c, name) > 0):
            raise ConfigError(f"config field {name}={getattr(c, name)} must be a finite number > 0")
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(c, name)
        if token is not None and not 0 <= token < c.vocab_size:
            raise ConfigError(
                f"config field {name}={token} must be a token id in [0, vocab_size={c.vocab_size}) "
                "(or null: none); fix the id or vocab_size"
            )
