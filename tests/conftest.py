"""pytest harness: one real PostgreSQL server per session, one fresh database per test.

Fixtures (the helpers behind them live in pgutil.py):

* ``pg_server`` (session) -- a `pgutil.PgServer`: ``admin_dsn``, ``host``, ``port``,
  ``version``, ``superuser``, ``password``, ``source``, ``dsn(dbname, user=None,
  password=None)``. Source: env CDCENGINE_TEST_DSN, else env CDCENGINE_TEST_DOCKER=1 with a
  reachable Docker engine, else a throwaway `TempCluster` from the local server binaries.
* ``db`` (function) -- a `pgutil.ScratchDatabase`: ``name``, ``dsn``, ``server``,
  ``execute(sql, params=None)``, ``create_role(...) -> (rolename, dsn)``. Slots, database and
  roles are dropped afterwards.
* ``make_cluster`` (function) -- ``make_cluster(settings=None, *, timezone=None, hba=None,
  files=None)`` starts an extra `TempCluster` (e.g. ``{"wal_level": "replica"}``; ``hba`` lines
  replace its pg_hba.conf, ``files`` go into its data directory) and cleans it up afterwards.

With no DSN, no Docker and no binaries the server fixtures *fail* (with the install hint)
rather than skip: the integration tier silently skipping would turn a broken CI machine green.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import pytest
import structlog
from pgutil import MakeCluster, PgServer, ScratchDatabase, open_test_server

from cdcengine_postgres.testing.cluster import ClusterError, TempCluster, find_bindir


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    """A failure pytest cannot format still fails only its test: after a signal (the
    pytest-timeout alarm) CPython 3.11 can leave a traceback entry without a line number,
    and pytest then crashes formatting it, ending the whole run with an INTERNALERROR instead
    of reporting a timeout. A plain list of the frames (and the captured output, where the
    timeout's thread dump is) stands in for pytest's own rendering."""
    try:
        return (yield)
    except TypeError:
        if call.excinfo is None:
            raise
        frames, tb = [], call.excinfo.tb
        while tb is not None:
            code = tb.tb_frame.f_code
            frames.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
            tb = tb.tb_next
        text = "\n".join(["Traceback (most recent call last):", *frames,
                          call.excinfo.exconly()])
        sections = [(f"Captured {key} {when}", content)
                    for when, key, content in item._report_sections]
        return pytest.TestReport(  # type: ignore[return-value]
            item.nodeid, item.location, dict.fromkeys(item.keywords, 1), "failed", text,
            call.when, sections, duration=call.duration, start=call.start, stop=call.stop,
            user_properties=item.user_properties)


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """A test that runs the CLI in-process configures structlog globally (its secrets, its
    level): put the previous configuration back so it cannot leak into later tests."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (see module docstring for the source order)."""
    try:
        with open_test_server() as server:
            yield server
    except ClusterError as exc:
        pytest.fail(f"no PostgreSQL server for the integration tests: {exc}", pytrace=False)


@pytest.fixture
def db(pg_server: PgServer) -> Iterator[ScratchDatabase]:
    """A fresh database ``t_<12 hex>`` for this test, dropped with its slots and roles."""
    scratch = ScratchDatabase(pg_server).create()
    try:
        yield scratch
    finally:
        scratch.drop()


@pytest.fixture
def make_cluster() -> Iterator[MakeCluster]:
    """Factory for extra throwaway clusters with given settings; all cleaned up afterwards.

    Skips the test when there are no server binaries (possible when the session server comes
    from CDCENGINE_TEST_DSN or Docker).
    """
    clusters: list[TempCluster] = []

    def factory(
        settings: Mapping[str, str | int] | None = None, *, timezone: str | None = None,
        hba: Sequence[str] | None = None, files: Mapping[str, bytes] | None = None,
    ) -> TempCluster:
        try:
            find_bindir()
        except ClusterError as exc:
            pytest.skip(f"needs local PostgreSQL server binaries: {exc}")
        cluster = TempCluster(settings, timezone=timezone, hba=hba, files=files)
        clusters.append(cluster)
        return cluster.start()

    try:
        yield factory
    finally:
        for cluster in reversed(clusters):
            cluster.cleanup()
