"""Shared fixtures: tiny checkpoints of several shapes, exported once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never download anything from a model hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the built-in tiny model of the test run out of the user's cache."""
    os.environ["MIXTRAL_TRT_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def make_checkpoint(root: Path, seed: int = 0, **overrides) -> Path:
    from mixtral_trt.export.tiny import tiny_config, write_tiny

    return write_tiny(root, tiny_config(**overrides), seed=seed)


def load_module(path: Path, name: str):
    """A Python file that is not part of the package (a script, a generated Triton model), as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
