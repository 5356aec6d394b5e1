"""config.json validation: every refusal names the field, its value and the constraint."""

from __future__ import annotations

import json

import pytest

from mixtral_trt.config import ConfigError, MixtralConfig, load_config

# Mixtral-8x7B-v0.1's config.json as published (transformers 4.x layout).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


def hf(**changes) -> dict:
    """The 8x7B config with fields replaced; a value of ``...`` deletes the field."""
    raw = dict(MIXTRAL_8X7B)
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def refused(raw: dict, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        MixtralConfig.from_hf(raw, source="test/config.json")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_mixtral_8x7b_config_parses():
    cfg = MixtralConfig.from_hf(MIXTRAL_8X7B)
    assert cfg.head_dim == 128
    assert cfg.kv_groups == 4
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 14336, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 8)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.vocab_size) == (8, 2, 32000)
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-5
    assert cfg.max_position_embeddings == 32768
    assert cfg.torch_dtype == "bfloat16"
    assert not cfg.tie_word_embeddings


def test_transformers5_rope_parameters_parse():
    # transformers 5 moves rope_theta into rope_parameters, writes "dtype" and head_dim null.
    raw = hf(rope_theta=..., torch_dtype=..., architectures=..., head_dim=None, dtype="bfloat16",
             rope_parameters={"rope_theta": 1e6, "rope_type": "default"})  # fmt: skip
    cfg = MixtralConfig.from_hf(raw)
    assert cfg.rope_theta == 1e6
    assert cfg.head_dim == 128
    assert cfg.torch_dtype == "bfloat16"


def test_round_trip_through_hf_dict():
    cfg = MixtralConfig.from_hf(MIXTRAL_8X7B)
    assert MixtralConfig.from_hf(cfg.to_hf()) == cfg
    assert MixtralConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_local_experts", "vocab_size",
                                   "intermediate_size", "rms_norm_eps"])  # fmt: skip
def test_missing_required_field(field):
    refused(hf(**{field: ...}), "test/config.json", f"{field!r}", "missing")


def test_missing_rope_theta():
    refused(hf(rope_theta=...), "'rope_theta'", "missing")


def test_missing_architecture_and_model_type():
    refused(hf(architectures=..., model_type=...), "'architectures'", "missing", "MixtralForCausalLM")


def test_unsupported_architecture():
    message = refused(hf(architectures=["LlamaForCausalLM"], model_type="llama"), "architectures", "LlamaForCausalLM")
    assert "only ['MixtralForCausalLM']" in message


def test_unsupported_model_type():
    refused(hf(model_type="llama"), "model_type", "'llama'", "expected 'mixtral'")


def test_hidden_not_divisible_by_heads():
    refused(hf(hidden_size=4000, num_attention_heads=48, num_key_value_heads=8),
            "hidden_size=4000", "num_attention_heads=48", "not divisible", "head_dim")  # fmt: skip


def test_explicit_head_dim_allows_any_hidden():
    cfg = MixtralConfig.from_hf(hf(hidden_size=4000, head_dim=128))
    assert cfg.head_dim == 128


def test_kv_heads_must_divide_heads():
    refused(hf(num_key_value_heads=6), "num_key_value_heads=6", "num_attention_heads=32", "must divide")


def test_top_k_at_most_experts():
    refused(hf(num_experts_per_tok=9), "num_experts_per_tok=9", "num_local_experts=8", "<=")


@pytest.mark.parametrize("field,value", [("hidden_size", "4096"), ("num_hidden_layers", 32.0),
                                         ("num_local_experts", True), ("head_dim", 128.5)])  # fmt: skip
def test_non_integer_field(field, value):
    refused(hf(**{field: value}), f"{field!r}", repr(value), "integer")


def test_non_number_float_field():
    refused(hf(rms_norm_eps="1e-5"), "'rms_norm_eps'", "'1e-5'", "number")


@pytest.mark.parametrize("field", ["num_hidden_layers", "num_local_experts", "vocab_size"])
def test_non_positive_field(field):
    refused(hf(**{field: 0}), f"{field}=0", "> 0")


@pytest.mark.parametrize(
    "changes",
    [
        {"rope_scaling": {"type": "yarn", "factor": 4.0}},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"rope_theta": ..., "rope_parameters": {"rope_theta": 1e6, "rope_type": "llama3"}},
    ],
)
def test_bad_rope_type(changes):
    raw = hf(**changes)
    params = raw.get("rope_scaling") or raw["rope_parameters"]
    refused(raw, "rope_type", repr(params.get("rope_type", params.get("type"))), "expected 'default'")


def test_bad_rope_theta():
    refused(hf(rope_theta=-1.0), "'rope_theta'", "-1.0", "positive")


def test_unsupported_dtype():
    refused(hf(torch_dtype="float8_e4m3fn"), "torch_dtype", "'float8_e4m3fn'", "bfloat16")


def test_sliding_window_refused():
    refused(hf(sliding_window=4096), "sliding_window=4096", "not supported")


def test_hidden_act_refused():
    refused(hf(hidden_act="gelu"), "hidden_act", "'gelu'", "'silu'")


def test_load_config_reports_path(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf(vocab_size=...)))
    with pytest.raises(ConfigError, match=r"config\.json: required field 'vocab_size' is missing"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    assert load_config(tmp_path).head_dim == 128


@pytest.mark.parametrize("value", ["yarn", [1.0]])
def test_rope_scaling_not_an_object(value):
    refused(hf(rope_scaling=value), "'rope_scaling'", repr(value), "object")


def test_sliding_window_not_an_integer():
    refused(hf(sliding_window="4096"), "'sliding_window'", "'4096'", "integer")


def test_sliding_window_covering_the_context_is_full_attention():
    assert MixtralConfig.from_hf(hf(sliding_window=32768)).max_position_embeddings == 32768
