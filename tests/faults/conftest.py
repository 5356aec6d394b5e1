"""Fixtures of the generation fault tests: the shared small export and one model loaded from it
per module (each module's refusals must leave its model usable)."""

from __future__ import annotations

import pytest

from ._generate_build import shared_export


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def model(build):
    from mixtral_trt import runtime

    return runtime.load(build)
