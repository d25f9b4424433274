"""The report's PNG plots. matplotlib is imported when a plot is drawn: it is an optional
dependency (the bench extra), not needed for --help or --plan."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from loadtest.bench.plan import MODES, TARGETS, WORKLOAD_LABELS, WORKLOADS
from loadtest.bench.results import Results

COLORS = {"direct": "#444444", "pgbouncer": "#1f77b4", "pgpool": "#ff7f0e",
          "pgpool-replicas": "#ffbb78", "pgsplit": "#2ca02c", "pgsplit-replicas": "#98df8a",
          "pgsplit-uncompiled": "#9467bd", "relay": "#8c564b",
          "pgsplit-2w": "#e377c2"}


def plot_throughput(res: Results, targets: Sequence[str], img_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    runs = [r for r in res.runs if r.phase == "throughput"]
    workloads = [w for w in WORKLOADS if any(r.workload == w for r in runs)]
    modes = [m for m in MODES if any(r.mode == m for r in runs)]
    clients = sorted({r.clients for r in runs})
    for w in workloads:
        fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 4.3), sharey=True,
                                 squeeze=False)
        for ax, m in zip(axes[0], modes):
            for t in targets:
                xs, ys, lo, hi = [], [], [], []
                for c in clients:
                    tps = [r.tps for r in res.ok("throughput", w, m, c, t)]
                    if tps:
                        xs.append(c)
                        ys.append(statistics.median(tps))
                        lo.append(min(tps))
                        hi.append(max(tps))
                if xs:
                    ax.plot(xs, ys, marker="o", label=TARGETS.get(t, t), color=COLORS.get(t))
                    ax.fill_between(xs, lo, hi, color=COLORS.get(t), alpha=0.15, linewidth=0)
                failed = [c for c in clients if res.by_key.get(("throughput", w, m, c, t))
                          and not res.ok("throughput", w, m, c, t)]
                if failed:  # every round failed: an x on the axis (see "Errors seen")
                    ax.plot(failed, [0] * len(failed), linestyle="none", marker="X",
                            markersize=9, color=COLORS.get(t), clip_on=False)
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients)
            ax.set_xticklabels([str(c) for c in clients])
            ax.set_title(f"-M {m}")
            ax.set_xlabel("clients")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("tps (median; band = min–max of rounds;\nX on the axis = every run failed)")
        axes[0][0].set_ylim(bottom=0)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if labels:
            fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8,
                       frameon=False)
        fig.suptitle(f"pgbench {WORKLOAD_LABELS[w]}: throughput by client count")
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = img_dir / f"bench-tps-{w}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append((f"Throughput, {WORKLOAD_LABELS[w]}", path))
    return out


def plot_latency(res: Results, targets: Sequence[str], img_dir: Path) -> tuple[str, Path] | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(w, m) for w in WORKLOADS for m in MODES
              if any(res.ok("throughput", w, m, 1, t) for t in targets)]
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4))
    width = 0.8 / len(targets)
    for i, t in enumerate(targets):
        p50 = [res.median("throughput", w, m, 1, t, "p50_ms") or 0 for w, m in groups]
        p99 = [res.median("throughput", w, m, 1, t, "p99_ms") or 0 for w, m in groups]
        xs = [g + (i - (len(targets) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, p99, width, color=COLORS.get(t), alpha=0.35)
        ax.bar(xs, p50, width, color=COLORS.get(t), label=TARGETS.get(t, t))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{w}\n-M {m}" for w, m in groups], fontsize=8)
    ax.set_ylabel("ms per transaction (solid p50, light p99)")
    ax.set_title("Latency at 1 client (medians over rounds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = img_dir / "bench-latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ("Latency at 1 client", path)
