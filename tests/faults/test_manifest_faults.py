"""A hand-edited or damaged manifest.json is refused with ManifestError naming the field; no other
exception type reaches a caller, and the CLI answers one ``Error:`` line.

The oracle is the exception type (and the field named in the message): a real export's manifest
is mutated — each key deleted, values replaced by other JSON types, random JSON — and every
reader is driven over it: ``read_manifest``, ``inspect``'s description, ``runtime.load`` and one
generated token (ONNX Runtime), an engine build's plan section.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixtral_trt import runtime
from mixtral_trt.cli import main
from mixtral_trt.inspect import describe
from mixtral_trt.manifest import MANIFEST, ManifestError, is_artifact, read_manifest, write_manifest
from mixtral_trt.runtime import GenerationError
from mixtral_trt.runtime.backends.tensorrt import engine_spec
from tests.export.conftest import small_checkpoint, small_export  # noqa: F401 - session fixtures

SEED = 18
# Values of every JSON type, and some that fit a field's type but not its meaning.
ODD = [None, True, False, 0, -1, 1, 2**70, 2.5, float("nan"), "", "8", "x", "../x", "/etc/passwd", "model.onnx",
       [], [1], ["batch", -3], {}, {"name": 1}]  # fmt: skip
CLEAN = (ManifestError, GenerationError)


def paths(value, at=()):
    """Every location in a JSON document, as key/index tuples, parents before children."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield at + (key,)
        yield from paths(child, at + (key,))


def mutated(doc, path, how, value=None):
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, -1, 7, 2**31, 2**63, -(2**80)])
    if kind == 2:
        return rng.choice([0.0, -0.5, 1e-9, 1e308, float("inf")])
    if kind in (3, 4):
        return rng.choice(["", "a", "model.plan", "float16", "batch", "..", "\u00e9\u0000", "sm_90"])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["name", "dtype", "shape", "bytes", "x"]): random_json(rng, depth + 1) for _ in range(3)}


def mutations(doc, count: int, rng: random.Random):
    """Each location deleted, then ``count`` random (location, value) replacements."""
    every = list(paths(doc))
    out = [(p, "delete", None) for p in every]
    for _ in range(count):
        value = rng.choice(ODD) if rng.random() < 0.6 else random_json(rng)
        out.append((rng.choice(every), "set", value))
    return out


def drive(directory: Path, doc: dict, readers) -> str:
    """Write ``doc`` as the manifest and run each reader; 'refused' or 'ok' — anything else raises."""
    (directory / MANIFEST).write_text(json.dumps(doc))
    try:
        manifest = read_manifest(directory, verify=False)
        for reader in readers:
            reader(directory, manifest)
    except CLEAN:
        return "refused"
    return "ok"


def run_mutations(directory: Path, doc: dict, readers, count: int, rest: dict | None = None) -> dict[str, int]:
    """Mutate ``doc`` (``rest``: further sections, kept as they are) and drive the readers over each."""
    rng = random.Random(SEED)
    seen, escaped = {"ok": 0, "refused": 0}, []
    for path, how, value in mutations(doc, count, rng):
        try:
            seen[drive(directory, {**mutated(doc, path, how, value), **(rest or {})}, readers)] += 1
        except Exception as exc:  # the defect under test: report the mutation that let it through
            escaped.append(f"{how} {'.'.join(map(str, path))} = {value!r}: {type(exc).__name__}: {exc}"[:300])
    assert not escaped, f"{len(escaped)} mutations escaped as other exceptions:\n" + "\n".join(escaped[:15])
    return seen


@pytest.fixture
def export_copy(small_export, tmp_path) -> Path:
    return Path(shutil.copytree(small_export, tmp_path / "export"))


def _load_and_generate(directory: Path, manifest: dict) -> None:
    model = runtime.load(directory, verify=False, threads=1)
    model.generate([[1, 5, 7]], max_new_tokens=1, greedy=True)


def test_mutated_export_manifest_is_read_or_refused(export_copy):
    doc = json.loads((export_copy / MANIFEST).read_text())
    # Reading and describing is cheap: every deletion and 400 replacements.
    seen = run_mutations(export_copy, doc, [lambda d, m: describe(m)], count=400)
    assert seen["refused"] > 300 and seen["ok"] > 20, seen  # both outcomes happen: the mutations reach the checks


def test_mutated_export_manifest_loads_or_is_refused(export_copy):
    # Loading builds an ONNX Runtime session: mutations of the sections a runtime reads.
    doc = json.loads((export_copy / MANIFEST).read_text())
    read = {k: doc[k] for k in ("format", "format_version", "stage", "config", "export", "io")}
    rest = {k: v for k, v in doc.items() if k not in read}
    seen = run_mutations(export_copy, read, [_load_and_generate], count=300, rest=rest)
    assert seen["refused"] > 200 and seen["ok"] > 20, seen
    # The untouched manifest still loads and generates.
    (export_copy / MANIFEST).write_text(json.dumps(doc))
    _load_and_generate(export_copy, doc)


@pytest.fixture
def engine_dir(small_export, tmp_path) -> Path:
    """An engine-stage build directory (the plan's bytes do not matter to the manifest)."""
    src = read_manifest(small_export, verify=False)
    directory = tmp_path / "engine"
    directory.mkdir()
    (directory / "model.plan").write_bytes(b"plan")
    body = {k: src[k] for k in ("config", "export", "io")}
    body["engine"] = {"plan_file": "model.plan", "target": "tensorrt", "trt_version": "11.1.0",
                      "cache_dtype": "float32", "target_sms": ["sm_90"], "profiles": [{"name": "decode"}],
                      "plugins": [{"name": "MixtralMoETop2", "version": "1", "namespace": "mixtral", "library": None,
                                   "sha256": None, "python": "mixtral_trt.plugins.moe_plugin"}]}  # fmt: skip
    write_manifest(directory, "engine", body)
    return directory


def test_mutated_engine_manifest_is_read_or_refused(engine_dir):
    doc = json.loads((engine_dir / MANIFEST).read_text())
    readers = [lambda d, m: describe(m), engine_spec]
    seen = run_mutations(engine_dir, doc, readers, count=300)
    assert seen["refused"] > 200 and seen["ok"] > 20, seen


# --- each class, with the field named ---------------------------------------------------------------


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


_DELETE = _Delete()


def _set(doc: dict, path: str, value) -> dict:
    """``doc`` with the value at ``path`` (keys joined by '/', list indices as numbers) replaced or deleted."""
    *parents, last = path.split("/")
    target = doc
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    key = int(last) if isinstance(target, list) else last
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value
    return doc


CASES = [
    ("files", [], "files must be an object"),
    ("files/model.onnx", 7, "files.model.onnx must be an object"),
    ("files/config.json/bytes", "605", r"files.config.json.bytes must be an integer >= 0, found \"605\""),
    ("files/config.json/bytes", -1, "files.config.json.bytes must be an integer >= 0"),
    ("files/config.json/sha256", "abc", "files.config.json.sha256 must be 64 lower-case hex digits"),
    ("files/config.json/sha256", "g" * 64, "files.config.json.sha256 must be 64 lower-case hex digits"),
    ("config", _DELETE, "config must be an object of model config fields, it is missing"),
    ("config/vocab_size", "200", "config: field 'vocab_size' must be an integer, found '200'"),
    ("config/rms_norm_eps", float("nan"), "config: field 'rms_norm_eps' must be a finite number"),
    ("config/hidden_size", _DELETE, r"required config fields \['hidden_size'\] are missing"),
    ("export", _DELETE, "export must be an object"),
    ("export/max_batch", "8", r"export.max_batch must be an integer >= 1, found \"8\""),
    ("export/max_batch", True, "export.max_batch must be an integer >= 1, found true"),
    ("export/max_seq_len", -1, "export.max_seq_len must be an integer from 1 to"),
    ("export/model_file", "../model.onnx", "export.model_file must be a file name of the directory"),
    ("export/data_file", "other.data", r"export.data_file='other.data' is not listed in files"),
    ("export/precision", 16, "export.precision must be a precision name"),
    ("io", "inputs", "io must be an object"),
    ("io/inputs", {}, "io.inputs must be a list"),
    ("io/inputs/0", "input_ids", r"io.inputs\[0\] must be an object"),
    ("io/inputs/0/dtype", _DELETE, r"io.inputs\[0\].dtype must be a dtype name, it is missing"),
    ("io/outputs/0/shape", ["batch", 1.5], r"io.outputs\[0\].shape must be a list of sizes"),
    ("io/inputs/4/name", "past_key_values.9.key", "io lists 4 past_key_values.* tensors; config.num_hidden_layers=2"),
    ("io/inputs/3/shape", ["batch", 3, "max_cache_len", 16], "config gives \\[batch, num_key_value_heads=1"),
    ("stage", "optimize", "optimize must be an object, it is missing"),
    ("tools", "x", "tools must be an object"),
]  # fmt: skip


@pytest.mark.parametrize("field, value, message", CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CASES])
def test_malformed_field_is_named(export_copy, field, value, message):
    doc = _set(json.loads((export_copy / MANIFEST).read_text()), field, value)
    (export_copy / MANIFEST).write_text(json.dumps(doc))
    for read in (lambda: read_manifest(export_copy, verify=False), lambda: runtime.load(export_copy, verify=False)):
        with pytest.raises(ManifestError, match=message) as info:
            read()
        assert str(export_copy / MANIFEST) in str(info.value) and "re-run the stage" in str(info.value)


@pytest.mark.parametrize("field, value, message", [
    ("engine/plan_file", "/etc/passwd", "engine.plan_file must be a file name of the directory"),
    ("engine/plan_file", "other.plan", "engine.plan_file='other.plan' is not listed in files"),
    ("engine/plugins/0/python", "os", r"engine.plugins\[0\].python must be null or a module of mixtral_trt.plugins"),
    ("engine/plugins/0", "MixtralMoETop2", r"engine.plugins\[0\] must be an object"),
    ("engine/target_sms", "sm_90", "engine.target_sms must be a list"),
    ("engine", _DELETE, "engine must be an object, it is missing"),
])  # fmt: skip
def test_malformed_engine_field_is_named(engine_dir, field, value, message):
    doc = _set(json.loads((engine_dir / MANIFEST).read_text()), field, value)
    (engine_dir / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=message):
        read_manifest(engine_dir, verify=False)


def test_manifest_that_is_not_an_object(export_copy):
    for text in ("[1, 2]", '"mixtral-trt"', "null"):
        (export_copy / MANIFEST).write_text(text)
        with pytest.raises(ManifestError, match="is not a mixtral-trt manifest"):
            read_manifest(export_copy)


def test_listed_directory_is_not_a_regular_file(export_copy):
    doc = json.loads((export_copy / MANIFEST).read_text())
    (export_copy / "sub").mkdir()
    doc["files"]["sub"] = {"bytes": 0, "sha256": "0" * 64}
    (export_copy / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="sub: not a regular file"):
        read_manifest(export_copy)


@pytest.mark.parametrize("max_batch", [2**70, 2**40])  # 2**40: petabytes, beyond any address space
def test_kv_cache_too_large_for_memory_is_a_clean_error(export_copy, max_batch):
    doc = json.loads((export_copy / MANIFEST).read_text())
    doc["export"]["max_batch"] = max_batch  # a valid integer, but no machine holds that cache
    (export_copy / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(GenerationError, match=f"cannot allocate the KV cache .*max_batch={max_batch}"):
        runtime.load(export_copy, verify=False)


def test_damaged_previous_output_is_still_ours_to_replace(export_copy):
    doc = json.loads((export_copy / MANIFEST).read_text())
    (export_copy / MANIFEST).write_text(json.dumps({**doc, "export": 7}))
    assert is_artifact(export_copy, "export")  # a rerun of the stage may replace it
    assert not is_artifact(export_copy, "engine")


def test_write_manifest_refuses_a_symbolic_link(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "elsewhere.data").write_bytes(b"weights")
    directory = tmp_path / "artifact"
    directory.mkdir()
    shutil.copy(tmp_path / "model.onnx", directory)
    (directory / "model.onnx.data").symlink_to(tmp_path / "elsewhere.data")
    with pytest.raises(ManifestError, match=r"symbolic links \['model.onnx.data'\].*Replace each link"):
        write_manifest(directory, "export", {})
    assert not (directory / MANIFEST).exists()


# --- the CLI: one line -----------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, named", [
    ("files/model.onnx/bytes", "27386", "files.model.onnx.bytes"),
    ("export/max_batch", "8", "export.max_batch"),
    ("io/inputs/0/shape", "batch", "io.inputs[0].shape"),
    ("config", _DELETE, "config"),
])  # fmt: skip
@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--verify"], ["generate", "--prompt-ids", "1,2"]])
def test_cli_gives_one_error_line(export_copy, field, value, named, command):
    doc = _set(json.loads((export_copy / MANIFEST).read_text()), field, value)
    (export_copy / MANIFEST).write_text(json.dumps(doc))
    result = CliRunner().invoke(main, [command[0], str(export_copy), *command[1:]])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and named in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
