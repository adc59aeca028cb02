"""Fixtures of the feedback tests: one real PostgreSQL server per test session, and a fresh
store location per test on either backend (``store_url``, parametrized sqlite / postgres)."""

from __future__ import annotations

import pytest

from tests.feedback.postgres import PostgresServer, binaries

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres():
    bindir = binaries()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install "
                    "postgresql (.ci/run installs it)")
    server = PostgresServer(bindir)
    yield server
    server.stop()


@pytest.fixture
def store_url(request, tmp_path):
    """A new, empty store of the backend named by the test's ``backend`` parameter."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres").fresh_url()
    return str(tmp_path / "feedback.db")


def pytest_generate_tests(metafunc):
    if "store_url" in metafunc.fixturenames:
        metafunc.parametrize("store_url", BACKENDS, indirect=True)
