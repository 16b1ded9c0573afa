"""`report.md` from a bench's results (pure: a dict in, markdown out), and the PNG plots
(matplotlib, imported only when plotting)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _num(value: object, fmt: str = ",.0f") -> str:
    return "-" if not isinstance(value, int | float) else format(value, fmt)


def _ratio(value: object) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.2f}×"


def _rate_cell(fig: Mapping[str, Any]) -> str:
    r = fig.get("rate") or {}
    if r.get("median") is None:
        return f"failed ({fig.get('failed', '?')} of {fig.get('runs', '?')})" \
            if fig.get("runs") else "-"
    return f"{_num(r['median'])} ({_num(r['min'])}–{_num(r['max'])})"


def _goal_lines(goals: list[Mapping[str, Any]]) -> list[str]:
    out = []
    for g in goals:
        value = g.get("value")
        shown = _num(value, ".2f") if isinstance(value, int | float) else "-"
        mark = {"met": "✅ met", "MISS": "❌ MISS"}.get(str(g.get("verdict")), "n/a")
        out.append(f"- goal **{g['goal']}** {g['target']}: {shown} → {mark}")
    return out


def _throughput_table(figures: Mapping[str, Any]) -> list[str]:
    lines = ["| consumer | changes/s median (min–max) | seconds median | peak RSS MB max | "
             "vs pg_recvlogical | vs before | read path |", "|---|---|---|---|---|---|---|"]
    for name, fig in figures.items():
        if not isinstance(fig, Mapping) or "rate" not in fig:
            continue
        lines.append(f"| {name} | {_rate_cell(fig)} | "
                     f"{_num(fig['seconds'].get('median'), '.2f')} | "
                     f"{_num(fig['peak_rss_mb'].get('max'), '.0f')} | "
                     f"{_ratio(fig.get('ratio_vs_pg_recvlogical'))} | "
                     f"{_ratio(fig.get('ratio_vs_before'))} | "
                     f"{fig.get('read_path') or '-'} |")
    return lines


def _bytecode_line(done: Any) -> str:
    if not done:
        return "- byte code: not prepared (an older results file)"
    builds = "; ".join(f"{d.get('python')}: {'compiled' if d.get('ok') else 'NOT compiled'}"
                       + (f" ({d['error']})" if d.get("error") else "") for d in done)
    return (f"- byte code: the engine builds' own modules compiled before the first leg, as a "
            f"pip install or the Docker image has them ({builds})")


def render(results: Mapping[str, Any]) -> str:
    """The report as markdown."""
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [f"# cdcengine bench — {results['started_at']} on {m.get('host')}", ""]
    verdict = "PASSED (every result correct)" if results["ok"] else \
        "FAILED — " + "; ".join(results.get("failures", [])[:10])
    lines += [f"**Run: {verdict}.**", ""]
    lines += [f"- machine: {m.get('cpu_count')} CPUs ({m.get('cpu_model')}), "
              f"{_num(m.get('memory_gb'), '.1f')} GB memory; load averages before "
              f"{results.get('load_before')}, after {results.get('load_after')}",
              f"- versions: cdcengine {v.get('cdcengine')} (commit {v.get('git_commit')}), "
              f"Python {v.get('python')}, deltalake {v.get('deltalake')}, pyarrow "
              f"{v.get('pyarrow')}, {results['source'].get('engine')} "
              f"{results['source'].get('version')}",
              f"- source: {results['source'].get('where')}; settings "
              f"{results['source'].get('settings')}",
              f"- bench settings: rows {s['rows']:,}, repeat {s['repeat']}, workloads "
              f"{', '.join(s['workloads'])}, engine settings {s['engine_settings'] or 'defaults'}",
              _bytecode_line(results.get("bytecode")),
              "",
              "How to read this: every engine figure is measured from outside — the time from "
              "starting `python -m cdcengine run` (imports and start-up included) until every "
              "change is durable in Delta — beside its raw limit measured on the same table, the "
              "same backlog, in the same run (all slots made before the backlog; baseline and "
              "engine order alternating). Rates are changes per second: median (min–max) over "
              "the repetitions. Every engine leg was checked against the source (count and "
              "checksum); a leg with a wrong result is a failure, never a rate.", ""]
    for name, res in results["workloads"].items():
        lines += [f"## {name}", ""]
        if "error" in res:
            lines += [f"**failed**: {res['error']}", ""]
            continue
        if res.get("note"):
            lines += [res["note"], ""]
        if "figures" in res:
            lines += _throughput_table(res["figures"])
            lines.append("")
        if name == "snapshot":
            for size, figs in res["sizes"].items():
                lines += [f"{int(size):,} rows:", ""]
                lines += _throughput_table(figs)
                lines += [f"engine vs COPY binary: "
                          f"{_ratio(figs['engine_consolidated'].get('ratio_vs_copy'))}"]
                if "engine_consolidated@before" in figs:
                    was = figs["engine_consolidated@before"]
                    lines.append(f"; before build vs COPY binary: "
                                 f"{_ratio(was.get('ratio_vs_copy'))}")
                lines.append("")
        if name == "merge":
            lines += [f"{res['changes']:,} changes per leg; seconds median (min–max), engine "
                      "timed from process start:", "",
                      "| table rows | random keys | recent keys |", "|---|---|---|"]
            for size, per in res["sizes"].items():
                cells = [f"{_num(per[k]['seconds']['median'], '.2f')} "
                         f"({_num(per[k]['seconds']['min'], '.2f')}–"
                         f"{_num(per[k]['seconds']['max'], '.2f')})" for k in ("random", "recent")]
                lines.append(f"| {int(size):,} | {cells[0]} | {cells[1]} |")
            lines += ["", f"10× rows / 1× rows: random {_ratio(res.get('ratio_random'))}, "
                          f"recent {_ratio(res.get('ratio_recent'))}", ""]
        if name == "latency":
            lat = res["latency_s"]
            lines += [f"{res['rate']}/s for {res['seconds']:.0f} s; commit→visible over "
                      f"{lat['n']:,} transactions: p50 {_num(lat['p50'], '.3f')} s, p95 "
                      f"{_num(lat['p95'], '.3f')} s, p99 {_num(lat['p99'], '.3f')} s "
                      f"(p99 per repetition median {_num(res['p99_per_rep']['median'], '.3f')} s)",
                      "", "![latency](latency.png)", ""]
        if name == "steady":
            lag = res["lag_s"]
            lines += [f"{res['rows']:,} rows, {res['target_rate']:,}/s target "
                      f"({_num(res['achieved_rate'])}/s achieved) for {res['seconds']:.0f} s; "
                      f"lag max {_num(lag['max'], '.2f')} s, p95 {_num(lag['p95'], '.2f')} s, "
                      f"at the end {_num(lag['final'], '.2f')} s; p99 "
                      f"{_num(lag.get('p99'), '.2f')} s (after the first minute "
                      f"{_num(lag.get('p99_after_60s'), '.2f')} s); merges "
                      f"{(res.get('merge_s') or {}).get('n', 0)}, median "
                      f"{_num((res.get('merge_s') or {}).get('median'), '.2f')} s, max "
                      f"{_num((res.get('merge_s') or {}).get('max'), '.2f')} s",
                      "", "![lag](lag.png)", ""]
        lines += _goal_lines(res.get("goals", []))
        for mode, prof in (res.get("profiles") or {}).items():
            if prof:
                lines.append(f"- profile ({mode}): [{prof}]({prof})")
        lines.append("")
    lines += ["## Plots", "", "![throughput](throughput.png)", "", "![rss](rss.png)", ""]
    return "\n".join(lines)


def plot(results: Mapping[str, Any], out: Path) -> list[str]:
    """Write the PNG plots next to the results; the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    bars: list[tuple[str, float, float, float]] = []
    for name, res in results["workloads"].items():
        figs = dict(res.get("figures") or {})
        for size, sized in (res.get("sizes") or {}).items():
            if name == "snapshot":
                figs.update({f"{k} {int(size):,}": f for k, f in sized.items()})
        for label, fig in figs.items():
            r = fig.get("rate") or {}
            if r.get("median"):
                bars.append((f"{name}\n{label}", r["median"], r["min"], r["max"]))
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4.5))
        xs = range(len(bars))
        med = [b[1] for b in bars]
        err = [[b[1] - b[2] for b in bars], [b[3] - b[1] for b in bars]]
        colors = ["#888888" if "engine" not in b[0] else "#1f77b4" for b in bars]
        ax.bar(xs, med, yerr=err, color=colors, capsize=3)
        ax.set_xticks(list(xs), [b[0] for b in bars], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("changes/s (median, min–max)")
        ax.set_title("throughput: engine (blue) beside its baseline (grey)")
        save(fig, "throughput.png")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    shown = set()
    for leg in results["legs"]:
        if leg["leg"] != "engine" or not leg.get("rss") or (leg["workload"], leg["label"]) \
                in shown:
            continue
        shown.add((leg["workload"], leg["label"]))
        ax.plot([p[0] for p in leg["rss"]], [p[1] / 2**20 for p in leg["rss"]],
                label=f"{leg['workload']} {leg['label']}")
    ax.axhline(512, color="red", linestyle=":", label="512 MB")
    ax.set_xlabel("seconds since process start")
    ax.set_ylabel("RSS of the process tree, MB")
    ax.set_title("engine RSS over time (first repetition of each leg)")
    ax.legend(fontsize=7)
    save(fig, "rss.png")
    lat = results["workloads"].get("latency")
    if lat and lat.get("histogram_s"):
        fig, ax = plt.subplots(figsize=(7, 4))
        h = lat["histogram_s"]
        width = h[1][0] - h[0][0] if len(h) > 1 else 0.05
        ax.bar([b[0] for b in h], [b[1] for b in h], width=width, align="edge")
        for p in ("p50", "p95", "p99"):
            if lat["latency_s"].get(p) is not None:
                ax.axvline(lat["latency_s"][p], linestyle="--", color="k", linewidth=0.8)
                ax.text(lat["latency_s"][p], ax.get_ylim()[1] * 0.9, p, fontsize=7)
        ax.set_xlabel("commit → visible in Delta, seconds")
        ax.set_ylabel("source transactions")
        ax.set_title("commit-to-visible latency")
        save(fig, "latency.png")
    steady = [leg for leg in results["legs"] if leg["workload"] == "steady" and leg.get("lag")]
    if steady:
        fig, ax = plt.subplots(figsize=(8, 4))
        series = steady[0]["lag"]
        ax.plot([p[0] for p in series], [p[1] for p in series])
        ax.set_xlabel("seconds since the engine started")
        ax.set_ylabel("Delta lag, seconds")
        ax.set_title("steady workload: Delta lag over time")
        save(fig, "lag.png")
    return written


__all__ = ["plot", "render"]
