"""The pipeline's report: what each stage kept and dropped and why, as markdown plus PNG plots.

FineWeb's habit: every filter is judged by reading what it removed, so the report lists a few
dropped examples per (stage, reason) next to the counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmstack.data.refine import STAGES
from llmstack.io import atomic_write, pyplot, save_png


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def stage_table(stats: dict[str, Any]) -> str:
    """Markdown table: docs and MB in/out per stage, seconds (summed over processes), drop reasons."""
    rows = [
        "| stage | docs in | docs out | MB in | MB out | CPU s | dropped because |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for stage in STAGES:
        s = stats["stages"][stage]
        drops = ", ".join(f"{r} {n}" for r, n in sorted(stats["drops"][stage].items(), key=lambda kv: -kv[1]))
        rows.append(
            f"| {stage} | {s['docs_in']} | {s['docs_out']} | {_mb(s['bytes_in'])} | {_mb(s['bytes_out'])} "
            f"| {s['seconds']:.1f} | {drops} |"
        )
    return "\n".join(rows)


def _plots(stats: dict[str, Any], out: Path) -> list[str]:
    plt = pyplot()
    names = []
    fig, ax = plt.subplots(figsize=(8, 4))
    langs = sorted(stats.get("languages", {}).items(), key=lambda kv: -kv[1])[:30]
    ax.bar([k for k, _ in langs], [v for _, v in langs])
    ax.set_yscale("log")
    ax.set_title("language of extracted documents (fastText lid.176)")
    ax.set_ylabel("documents")
    fig.tight_layout()
    save_png(fig, out / "languages.png", dpi=100)
    names.append("languages.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label in (("lengths_filtered", "after filters"), ("lengths_final", "after dedup (output)")):
        lengths = [max(1, n) for n in stats.get(key, [])]
        if lengths:
            ax.hist(lengths, bins=40, alpha=0.6, label=f"{label} ({len(lengths)})", log=True)
    ax.set_xlabel("characters per document")
    ax.set_ylabel("documents")
    ax.legend()
    ax.set_title("document lengths")
    fig.tight_layout()
    save_png(fig, out / "lengths.png", dpi=100)
    names.append("lengths.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    sizes = stats.get("dedup", {}).get("cluster_sizes", [])
    if sizes:
        ax.hist(sizes, bins=range(2, max(sizes) + 2), log=True)
    ax.set_xlabel("near-duplicate cluster size (documents)")
    ax.set_ylabel("clusters")
    ax.set_title(f"MinHash clusters ({len(sizes)} with more than one document)")
    fig.tight_layout()
    save_png(fig, out / "clusters.png", dpi=100)
    names.append("clusters.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(len(STAGES)), [stats["stages"][s]["docs_out"] for s in STAGES], marker="o")
    ax.set_xticks(range(len(STAGES)), STAGES, rotation=40, ha="right")
    ax.set_ylabel("documents kept")
    ax.set_title("documents left after each stage")
    fig.tight_layout()
    save_png(fig, out / "funnel.png", dpi=100)
    names.append("funnel.png")
    return names


def write_report(stats: dict[str, Any], out: Path, title: str, seconds: float) -> Path:
    """Write ``report.md`` and its plots into ``out``; returns the markdown's path."""
    out = Path(out)
    images = _plots(stats, out)
    d = stats.get("dedup", {})
    lines = [
        f"# {title}",
        "",
        f"Wall time {seconds:.1f}s. Exact duplicates {d.get('n_exact', 0)}, near duplicates {d.get('n_near', 0)}"
        f" in {len(d.get('cluster_sizes', []))} clusters (largest {max(d.get('cluster_sizes', [0]) or [0])}). "
        f"PII replaced: {stats.get('pii', {}).get('emails', 0)} e-mails, {stats.get('pii', {}).get('ips', 0)} IPs. "
        f"Notes: {stats.get('notes') or 'none'}.",
        "",
        stage_table(stats),
        "",
        *[f"![{name}]({name})" for name in images],
        "",
        "## Dropped examples",
        "",
    ]
    for stage in STAGES:
        for reason, examples in sorted(stats["examples"][stage].items()):
            lines.append(f"### {stage}: {reason} ({stats['drops'][stage].get(reason, 0)})")
            lines.append("")
            for ex in examples:
                snippet = " ".join(ex["text"].split())[:300]
                lines.append(f"- `{ex['url']}`" + (f": {snippet}" if snippet else ""))
            lines.append("")
    path = out / "report.md"
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    return path
