"""`cdcengine.metrics.Metrics`: SPEC §7 names and labels, parseable exposition, no shared state."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cdcengine.metrics import CONTENT_TYPE, Metrics
from cdcengine.state.base import SourceState

REQUIRED = {  # SPEC §7 names (as the exposition's sample names), plus the extras
    "cdcengine_slot_lag_bytes", "cdcengine_slot_retained_wal_bytes",
    "cdcengine_rows_applied_total", "cdcengine_commit_latency_seconds",
    "cdcengine_source_state", "cdcengine_slot_auto_drops_total", "cdcengine_errors_total",
    "cdcengine_bytes_applied_total", "cdcengine_batch_latency_seconds",
    "cdcengine_commit_to_delta_seconds",
}


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered text, parsed back: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def declared(m: Metrics) -> set[str]:
    return {line.split()[2] for line in m.render().decode().splitlines()
            if line.startswith("# TYPE ")}


def test_every_required_name_is_declared_even_before_anything_happened() -> None:
    m = Metrics()
    assert REQUIRED <= declared(m)
    assert all(name.startswith("cdcengine_") for name in declared(m))
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_monitor_calls_record_slot_state_drops_and_errors() -> None:
    m = Metrics()
    m.observe_slot("shop", lag_bytes=1024, retained_wal_bytes=4096)
    m.count_auto_drop("shop")
    m.count_auto_drop("shop")
    m.count_error("shop", "connection_failed")
    m.count_error("crm", "auth_failed")
    m.set_source_state("shop", "warning")
    got = samples(m)
    assert got[("cdcengine_slot_lag_bytes", (("source", "shop"),))] == 1024
    assert got[("cdcengine_slot_retained_wal_bytes", (("source", "shop"),))] == 4096
    assert got[("cdcengine_slot_auto_drops_total", (("source", "shop"),))] == 2
    assert got[("cdcengine_errors_total",
                (("reason", "connection_failed"), ("source", "shop")))] == 1
    assert got[("cdcengine_errors_total", (("reason", "auth_failed"), ("source", "crm")))] == 1
    states = {dict(labels)["state"]: v for (name, labels), v in got.items()
              if name == "cdcengine_source_state"}
    assert states == {str(s): (1.0 if s is SourceState.WARNING else 0.0) for s in SourceState}


def test_source_state_is_one_hot_across_changes_and_accepts_other_states() -> None:
    m = Metrics()
    m.set_source_state("shop", SourceState.STREAMING)
    m.set_source_state("shop", "broken")
    m.set_source_state("crm", "reconnecting")  # not a stored state: still exposed
    got = samples(m)

    def state(source: str) -> dict[str, float]:
        return {dict(labels)["state"]: v for (name, labels), v in got.items()
                if name == "cdcengine_source_state" and dict(labels)["source"] == source}

    assert [k for k, v in state("shop").items() if v == 1] == ["broken"]
    assert [k for k, v in state("crm").items() if v == 1] == ["reconnecting"]
    assert state("crm")["streaming"] == 0


def test_an_unknown_slot_reading_removes_the_stale_series() -> None:
    m = Metrics()
    m.observe_slot("shop", lag_bytes=10, retained_wal_bytes=20)
    m.observe_slot("shop", lag_bytes=None, retained_wal_bytes=30)
    got = samples(m)
    assert ("cdcengine_slot_lag_bytes", (("source", "shop"),)) not in got
    assert got[("cdcengine_slot_retained_wal_bytes", (("source", "shop"),))] == 30
    m.observe_slot("shop", lag_bytes=None, retained_wal_bytes=None)  # twice: no error
    m.observe_slot("shop", lag_bytes=None, retained_wal_bytes=None)
    assert not [k for k in samples(m) if k[0].startswith("cdcengine_slot_")]


def test_write_path_rows_bytes_and_latency_histograms() -> None:
    m = Metrics()
    m.count_applied("shop", "public.orders", rows=3, nbytes=300)
    m.count_applied("shop", "public.orders", rows=2, nbytes=200)
    m.count_applied("shop", "public.items", rows=1, nbytes=50)
    m.observe_commit("shop", 0.02)
    m.observe_commit("shop", 3.0)
    m.observe_batch("shop", seconds=0.5, commit_to_delta_s=[1.5, 0.5])  # two transactions
    m.observe_batch("shop", seconds=0.1)  # wrote no row
    m.observe_batch("shop", seconds=0.1, commit_to_delta_s=[-2.0])  # clock skew: counted as 0
    got = samples(m)
    orders = (("source", "shop"), ("table", "public.orders"))
    assert got[("cdcengine_rows_applied_total", orders)] == 5
    assert got[("cdcengine_bytes_applied_total", orders)] == 500
    assert got[("cdcengine_rows_applied_total",
                (("source", "shop"), ("table", "public.items")))] == 1
    shop = (("source", "shop"),)
    assert got[("cdcengine_commit_latency_seconds_count", shop)] == 2
    assert got[("cdcengine_commit_latency_seconds_sum", shop)] == 3.02
    assert got[("cdcengine_batch_latency_seconds_count", shop)] == 3
    assert got[("cdcengine_commit_to_delta_seconds_count", shop)] == 3  # one per transaction
    assert got[("cdcengine_commit_to_delta_seconds_sum", shop)] == 2.0
    assert got[("cdcengine_commit_latency_seconds_bucket", (("le", "0.025"), *shop))] == 1
    assert got[("cdcengine_commit_latency_seconds_bucket", (("le", "+Inf"), *shop))] == 2
    # no `_created` companion series: only noise in the text format
    assert not [k for k in got if k[0].endswith("_created")]


def test_instances_share_nothing() -> None:
    a, b = Metrics(), Metrics()
    a.count_applied("shop", "public.t", rows=7, nbytes=70)
    assert ("cdcengine_rows_applied_total", (("source", "shop"), ("table", "public.t"))) \
        in samples(a)
    assert not [k for k in samples(b) if k[0] == "cdcengine_rows_applied_total"]


def test_label_values_are_escaped_in_the_exposition() -> None:
    m = Metrics()
    table = 'public."odd\\name"'
    m.count_applied("shop", table, rows=1, nbytes=1)
    assert samples(m)[("cdcengine_rows_applied_total",
                       (("source", "shop"), ("table", table)))] == 1
