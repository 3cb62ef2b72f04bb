"""The diffusers suites' fixtures: artifacts are built in a session folder; diffusers' test marks are registered."""
import pytest

# marks diffusers' test decorators put on classes and tests (registered as diffusers' own conftest does)
UPSTREAM_MARKS = ("big_accelerator", "lora", "ip_adapter", "attention", "memory", "cpu_offload", "group_offload",
                  "compile", "cache", "quantization", "nightly")


def pytest_configure(config):
    for mark in UPSTREAM_MARKS:
        config.addinivalue_line("markers", f"{mark}: a diffusers test mark (tests/diffusers_suites)")


@pytest.fixture(scope="session", autouse=True)
def _suite_artifacts(tmp_path_factory):
    from . import harness

    harness.ROOT = tmp_path_factory.mktemp("diffusers-suites")
    yield
