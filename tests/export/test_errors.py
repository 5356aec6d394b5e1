"""Bad input to export is refused with a clear message, and nothing appears at the output path.

Every case runs twice: through ``export()`` (the exception type and message) and through
``mixtral-build export`` (exit status 1, ``Error: …``, no traceback). Checkpoint validation
happens before tracing, so these are fast.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from mixtral_trt.cli import main
from mixtral_trt.config import ConfigError
from mixtral_trt.export.checkpoint import CheckpointError
from mixtral_trt.export.onnx_export import ExportError
from mixtral_trt.manifest import read_manifest, write_manifest
from tests.export.conftest import MAX_BATCH, MAX_SEQ, export_small

# --- helpers ---------------------------------------------------------------------------------


def snapshot(path: Path):
    """Everything at ``path``: None when absent, bytes for a file, {relative name: bytes} for a tree."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "<dir>" for p in sorted(path.rglob("*"))}


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings that an atomic write failed to clean up."""
    return sorted(p.name for p in parent.glob(".*") if "partial" in p.name or ".old-" in p.name)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del raw[key]
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def shard(src: Path, dst: Path, n: int) -> Path:
    """Re-save ``src``'s model.safetensors as ``n`` shards plus model.safetensors.index.json.

    Names are dealt round-robin, so each expert's w1, w2 and w3 land in different shards.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    dst.mkdir(parents=True)
    weight_map = {}
    for k in range(n):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        part = {name: tensors[name] for name in names[k::n]}
        save_file(part, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name in ("config.json", "tokenizer.model", "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


class PickleTrap:
    """Unpickling this creates ``marker``: proof that someone ran the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


# --- bad checkpoints -------------------------------------------------------------------------
# Each builder gets (a copy of) the small checkpoint and tmp_path and returns the model dir.


def missing_field(ckpt: Path, tmp: Path) -> Path:
    edit_config(ckpt, hidden_size=...)
    return ckpt


def llama_architecture(ckpt: Path, tmp: Path) -> Path:
    edit_config(ckpt, architectures=["LlamaForCausalLM"], model_type="llama")
    return ckpt


MISSING = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
EXTRA = "model.layers.0.self_attn.q_norm.weight"
MISSHAPED = "model.layers.1.self_attn.k_proj.weight"


def tensor_mismatch(ckpt: Path, tmp: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    del tensors[MISSING]
    tensors[EXTRA] = torch.ones(16)
    tensors[MISSHAPED] = torch.zeros(8, 32)  # config implies [kv_heads * head_dim, hidden] = [16, 32]
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt


def truncated(ckpt: Path, tmp: Path) -> Path:
    path = ckpt / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    return ckpt


def corrupt_header(ckpt: Path, tmp: Path) -> Path:
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [32]}}).encode()
    (ckpt / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(128))
    return ckpt


def pickle_only(ckpt: Path, tmp: Path) -> Path:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(PickleTrap(tmp / "UNPICKLED")))
    return ckpt


def missing_shard(ckpt: Path, tmp: Path) -> Path:
    sharded = shard(ckpt, tmp / "sharded", 2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    return sharded


def no_directory(ckpt: Path, tmp: Path) -> Path:
    return tmp / "no-such-checkpoint"


# name: (builder, exception, message fragments, single-line message)
BAD_CHECKPOINTS = {
    "missing-field": (missing_field, ConfigError, ["config.json", "'hidden_size'", "missing"], True),
    "architecture": (llama_architecture, ConfigError, ["LlamaForCausalLM", "MixtralForCausalLM"], True),
    "tensors": (tensor_mismatch, CheckpointError,
                ["does not match its config.json", f"missing tensors (1): {MISSING}",
                 f"unexpected tensors (1): {EXTRA}", f"{MISSHAPED!r} has shape [8, 32], config implies [16, 32]"],
                False),
    "truncated": (truncated, CheckpointError, ["model.safetensors is truncated", "bytes"], True),
    "corrupt-header": (corrupt_header, CheckpointError, ["corrupt safetensors header", "'model.norm.weight'"], True),
    "pickle-only": (pickle_only, CheckpointError, ["pytorch_model.bin", "pickle", "safetensors"], True),
    "missing-shard": (missing_shard, CheckpointError,
                      ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "do not exist"], True),
    "no-directory": (no_directory, CheckpointError, ["no-such-checkpoint", "does not exist"], True),
}  # fmt: skip


def run_export(how: str, model_dir: Path, out: Path, max_seq_len: int = MAX_SEQ):
    """Export through the API or the CLI; returns the error message (fails if it succeeded)."""
    if how == "api":
        from mixtral_trt.export.onnx_export import export

        with pytest.raises((ConfigError, CheckpointError, ExportError)) as info:
            export(model_dir, out, max_batch=MAX_BATCH, max_seq_len=max_seq_len, progress=False)
        return info
    args = ["export", "--model", str(model_dir), "--out", str(out), "--max-batch", str(MAX_BATCH),
            "--max-seq-len", str(max_seq_len)]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: "), result.output
    return result


def check_refusal(how, outcome, exc_type, fragments, single_line) -> None:
    if how == "api":
        assert outcome.type is exc_type, outcome.value
        message = str(outcome.value)
    else:
        message = outcome.output.removeprefix("Error: ").rstrip("\n")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if single_line:
        assert "\n" not in message, message


@pytest.mark.parametrize("how", ["api", "cli"])
@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_refused(case, how, small_checkpoint, tmp_path):
    build, exc_type, fragments, single_line = BAD_CHECKPOINTS[case]
    model_dir = build(copy_checkpoint(small_checkpoint, tmp_path / "ckpt"), tmp_path)
    out = tmp_path / "outputs" / "export"
    outcome = run_export(how, model_dir, out)
    check_refusal(how, outcome, exc_type, fragments, single_line)
    assert not out.parent.exists(), "the output's parent was created for a refused export"
    assert leftovers(tmp_path) == []


def test_pickle_is_never_loaded(small_checkpoint, tmp_path):
    armed = tmp_path / "ARMED"
    pickle.loads(pickle.dumps(PickleTrap(armed)))  # the trap works: unpickling creates its marker
    assert armed.is_dir()

    model_dir = pickle_only(copy_checkpoint(small_checkpoint, tmp_path / "ckpt"), tmp_path)
    for how in ("api", "cli"):
        run_export(how, model_dir, tmp_path / "out")
    assert not (tmp_path / "UNPICKLED").exists(), "the pickle checkpoint was unpickled"
    assert not (tmp_path / "out").exists()


# --- bad output paths ------------------------------------------------------------------------


def foreign_dir(out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")


def a_file(out: Path) -> None:
    out.write_text("not a directory\n")


def other_stage(out: Path) -> None:
    out.mkdir()
    (out / "model.onnx").write_bytes(b"lowered")
    write_manifest(out, "optimize", {})


BAD_OUTPUTS = {
    "non-empty-dir": (foreign_dir, ["not empty", "no previous export", "refusing to overwrite"]),
    "file": (a_file, ["exists and is a file"]),
    "other-stage": (other_stage, ["not empty", "no previous export"]),
}


@pytest.mark.parametrize("how", ["api", "cli"])
@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_bad_output_path_refused(case, how, small_checkpoint, tmp_path):
    make, fragments = BAD_OUTPUTS[case]
    out = tmp_path / "out"
    make(out)
    before = snapshot(out)
    outcome = run_export(how, small_checkpoint, out)
    check_refusal(how, outcome, ExportError, [str(out), *fragments], True)
    assert snapshot(out) == before, "the existing output path was modified"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["api", "cli"])
def test_max_seq_len_beyond_model_refused(how, small_checkpoint, tmp_path):
    out = tmp_path / "out"
    outcome = run_export(how, small_checkpoint, out, max_seq_len=5000)
    check_refusal(how, outcome, ExportError, ["--max-seq-len=5000", "max_position_embeddings=4096"], True)
    assert not out.exists()
    assert leftovers(tmp_path) == []


# --- successful replacement and sharded checkpoints --------------------------------------------


def test_previous_export_is_replaced(small_checkpoint, small_export, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.onnx").write_bytes(b"from an older export")
    write_manifest(out, "export", {"export": {"model_file": "stale.onnx"}})
    args = ["export", "--model", str(small_checkpoint), "--out", str(out), "--max-batch", str(MAX_BATCH),
            "--max-seq-len", str(MAX_SEQ), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output
    assert not (out / "stale.onnx").exists()
    read_manifest(out, "export")  # re-hashes every file
    assert (out / "model.onnx.data").read_bytes() == (small_export / "model.onnx.data").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_sharded_checkpoint_exports_identically(small_checkpoint, small_export, tmp_path):
    sharded = shard(small_checkpoint, tmp_path / "sharded", 3)
    out = export_small(sharded, tmp_path / "export")

    assert (out / "model.onnx.data").read_bytes() == (small_export / "model.onnx.data").read_bytes()
    got = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    want = onnx.load(str(small_export / "model.onnx"), load_external_data=False).graph
    assert len(got.node) == len(want.node)
    for a, b in zip(got.node, want.node):
        assert a == b, f"node {a.name} differs from {b.name}"
    assert list(got.initializer) == list(want.initializer)
    assert list(got.input) == list(want.input) and list(got.output) == list(want.output)

    manifest = read_manifest(out, "export")
    assert manifest["source"]["files"] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert manifest["config"] == read_manifest(small_export, "export", verify=False)["config"]


def test_index_without_weight_map_refused(small_checkpoint, tmp_path):
    from mixtral_trt.export.checkpoint import open_checkpoint

    sharded = shard(small_checkpoint, tmp_path / "sharded", 2)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["not", "a", "map"]}))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        open_checkpoint(sharded)
