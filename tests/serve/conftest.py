"""A server on a free loopback port over the shared tiny export (Mixtral's tokenizer, 2 slots,
max_seq_len 24), started in this process and stopped after the module's tests."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.faults._generate_build import shared_export  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    return shared_export(tmp_path_factory)


@pytest.fixture(scope="session")
def oracle(build):
    """A model of its own, never served: what each request gets alone through ``generate``."""
    from mixtral_trt import runtime

    return runtime.load(build)


@dataclasses.dataclass
class Served:
    url: str
    model: object

    @property
    def executor(self):
        return self.model.executor

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request waits or holds a slot (bounded)."""
        deadline = time.monotonic() + timeout
        while self.executor.busy:
            if time.monotonic() > deadline:
                raise AssertionError(f"the executor is still busy after {timeout} s: {self.executor.stats()}")
            time.sleep(0.01)


def scrape(url: str) -> dict[str, float]:
    """GET /metrics parsed by prometheus_client's own parser: {sample name{labels}: value}."""
    import httpx

    parser = pytest.importorskip("prometheus_client.parser")
    out = {}
    for family in parser.text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


@contextlib.contextmanager
def running_server(model, name: str = NAME):
    from mixtral_trt.serve import create_app, listen, make_server

    server = make_server(create_app(model, name))
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", model)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "the test server did not stop"


@pytest.fixture(scope="module")
def served(build):
    from mixtral_trt import runtime

    with running_server(runtime.load(build, verify=False, executor={"max_queue": 64})) as s:
        yield s


class GatedBackend:
    """A backend whose every step first waits for ``gate`` (so a test can hold the executor in a
    step), then sleeps ``delay`` seconds (so a stream lasts long enough to walk away from), then
    raises ``fail`` if set (a backend that breaks)."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.fail: str | None = None  # a message: every step raises it

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def _wait(self) -> None:
        if not self.gate.wait(20):
            raise RuntimeError("the test never opened the gate")
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError(self.fail)

    def step(self, *args):
        self._wait()
        return self._backend.step(*args)

    def step_rows(self, *args):
        self._wait()
        return self._backend.step_rows(*args)


@pytest.fixture(scope="module")
def gated(build):
    """A server whose queue holds one request, over a GatedBackend (``served.model.backend``)."""
    from mixtral_trt import runtime

    base = runtime.load(build, verify=False)
    model = runtime.Model(GatedBackend(base.backend), base.tokenizer, base.manifest, max_queue=1)
    with running_server(model) as s:
        yield s
        model.backend.gate.set()
