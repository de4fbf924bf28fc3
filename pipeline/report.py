"""The run report: one `report.html` beside summary.json, with plots (matplotlib) and tables.

    <output>/runs/job=<job>/<run_id>/report.html

Sections (each an <h2 id=...>, a PNG embedded as base64, and the numbers as a table):
    throughput  clips finished over time, and the rate in each minute
    latency     p50 / p90 / p99 per stage: decode (per clip), prefill and generate (per model
                call, i.e. per distinct batch_id, since those columns are per call)
    tokens      visual tokens kept per layer: the schedule drawn from the rows (drop_layers and
                the mean of visual_tokens_per_stage), one line per schedule
    retention   retention achieved per row against the retention asked
    errors      error rows by stage and reason (the message without the file name), skips by reason
    cost        video-hours per GPU-hour and cost per video-hour (CPU runs: per CPU-hour, no cost)

Made from this run's rows (the files it wrote) and its summary; `render` is pure (rows and
summary in, HTML out), `write_report` reads and writes through `pipeline.storage`.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.storage import Storage

REPORT_NAME = "report.html"
COLUMNS = ("clip_id", "status", "error", "error_stage", "skip_reason", "finished_at", "decode_ms", "inputs_ms", "prefill_ms",
           "generate_ms", "batch_id", "retention_asked", "retention_achieved", "visual_tokens_per_stage", "drop_layers")
PERCENTILES = (50, 90, 99)
SECTIONS = ("throughput", "latency", "tokens", "retention", "errors", "cost")
REASON_CHARS = 70
THROUGHPUT_BINS = 20


def write_report(storage: Storage, run_dir: str, summary: dict[str, Any], files: list[str]) -> str:
    tables = [storage.read_parquet(uri, columns=list(COLUMNS), absent_as_null=True) for uri in files]
    rows = pa.concat_tables(tables, promote_options="permissive") if tables else None
    uri = f"{run_dir}/{REPORT_NAME}"
    storage.write_bytes_atomic(uri, render(summary, rows).encode())
    return uri


def render(summary: dict[str, Any], rows: pa.Table | None) -> str:
    """The report's HTML: every section, in SECTIONS order, whatever the run wrote (none: said so)."""
    rows = rows if rows is not None else pa.table({c: pa.array([], pa.null()) for c in COLUMNS})
    records = rows.select(list(COLUMNS)).to_pylist()
    parts = [_head(summary)]
    for name, (title, figure, table) in zip(SECTIONS, (
        throughput(records, summary), latency(records), tokens_per_layer(records), retention(records),
        errors(records), cost(summary),
    )):
        parts.append(f'<h2 id="{name}">{html.escape(title)}</h2>')
        if figure is not None:
            parts.append(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(figure).decode()}">')
        parts.append(_table(table))
    return "\n".join(parts + ["</body></html>"])


# --- sections: (title, PNG bytes or None, [(label, value)...]) ---------------------------------


def throughput(records: list[dict], summary: dict[str, Any]) -> tuple[str, bytes | None, list]:
    started = _time(summary["started_at"])
    done = sorted(_time(r["finished_at"]) for r in _per_clip(records) if r["finished_at"] is not None)
    minutes = [(t - started).total_seconds() / 60 for t in done]
    table = [("clips finished (ok or failed)", len(done)), ("wall time", f"{summary['wall_s']:.1f} s"),
             ("clips/s (ok clips)", f"{summary['clips_per_s']:.3f}"),
             ("output tokens/s", f"{summary['output_tokens_per_s']:.1f}")]
    if not minutes:
        return "Throughput over time", None, table + [("note", "no clips finished")]
    fig, axes = _figure(2)
    axes[0].step([0.0, *minutes], range(len(minutes) + 1), where="post")
    axes[0].set(xlabel="minutes since the run started", ylabel="clips finished", title="cumulative", xlim=(0, None))
    counts, edges = np.histogram(minutes, bins=THROUGHPUT_BINS, range=(0.0, max(minutes)))
    width_min = np.diff(edges)
    axes[1].bar(edges[:-1], counts / (width_min * 60), width=width_min, align="edge")
    axes[1].set(xlabel="minutes since the run started", ylabel="clips/s", title=f"rate in {THROUGHPUT_BINS} intervals")
    return "Throughput over time", _png(fig), table


def latency(records: list[dict]) -> tuple[str, bytes | None, list]:
    stages = latency_samples(records)
    table = [(f"{stage} p{p} (ms)", f"{np.percentile(v, p):.1f}" if v else "n/a")
             for stage, v in stages.items() for p in PERCENTILES]
    table += [(f"{stage} samples", f"{len(v)} {'clips' if stage == 'decode' else 'model calls'}")
              for stage, v in stages.items()]
    if not any(stages.values()):
        return "Latency percentiles per stage", None, table
    fig, axes = _figure(1)
    ax = axes[0]
    x = np.arange(len(stages))
    for i, p in enumerate(PERCENTILES):
        values = [np.percentile(v, p) if v else 0 for v in stages.values()]
        ax.bar(x + (i - 1) * 0.27, values, width=0.27, label=f"p{p}")
    ax.set_xticks(x, [f"{s}\n(per {'clip' if s == 'decode' else 'call'})" for s in stages])
    ax.set(ylabel="ms", title="latency percentiles")
    ax.legend()
    return "Latency percentiles per stage", _png(fig), table


def latency_samples(records: list[dict]) -> dict[str, list[float]]:
    """decode_ms once per clip; inputs_ms, prefill_ms and generate_ms once per model call (batch_id)."""
    calls = {r["batch_id"]: r for r in records if r["batch_id"] is not None}
    return {
        "decode": [r["decode_ms"] for r in _per_clip(records) if r["decode_ms"] is not None],
        "inputs": [r["inputs_ms"] for r in calls.values() if r["inputs_ms"] is not None],
        "prefill": [r["prefill_ms"] for r in calls.values() if r["prefill_ms"] is not None],
        "generate": [r["generate_ms"] for r in calls.values() if r["generate_ms"] is not None],
    }


def kept_per_layer(records: list[dict]) -> dict[tuple[int, ...], tuple[list[float], int]]:
    """Per schedule (drop_layers): the mean visual tokens of each stage, and the rows averaged.
    Example: layers (3, 16), rows [[1000, 250, 125], [2000, 500, 250]] -> {(3, 16): ([1500, 375, 187.5], 2)}."""
    by_schedule: dict[tuple[int, ...], list[list[int]]] = {}
    for r in records:
        stages = r["visual_tokens_per_stage"]
        if r["status"] == "ok" and stages and r["drop_layers"] is not None and len(stages) == len(r["drop_layers"]) + 1:
            by_schedule.setdefault(tuple(r["drop_layers"]), []).append(stages)
    return {layers: (np.mean(np.array(s, dtype=float), axis=0).tolist(), len(s)) for layers, s in by_schedule.items()}


def tokens_per_layer(records: list[dict]) -> tuple[str, bytes | None, list]:
    schedules = kept_per_layer(records)
    table = [(f"drop layers {list(layers)} ({n} rows)", " -> ".join(f"{v:.0f}" for v in means))
             for layers, (means, n) in schedules.items()]
    if not schedules:
        return "Visual tokens kept per layer", None, [("note", "no ok rows with visual-token counts")]
    fig, axes = _figure(1)
    for layers, (means, n) in schedules.items():
        last = (max(layers) if layers else 0) + 4
        x = [0, *layers, last]
        y = [means[0], *means[1:], means[-1]]
        axes[0].step(x, y, where="post", label=f"drop layers {list(layers) or 'none'} ({n} rows)")
        for layer in layers:
            axes[0].axvline(layer, color="grey", lw=0.5, ls=":")
    axes[0].set(xlabel="language-model layer", ylabel="visual tokens (mean per row)",
                title="visual tokens each layer processes")
    axes[0].legend()
    return "Visual tokens kept per layer", _png(fig), table


def retention(records: list[dict]) -> tuple[str, bytes | None, list]:
    ok = [r for r in records if r["status"] == "ok" and r["retention_achieved"] is not None]
    achieved = [r["retention_achieved"] for r in ok]
    asked = sorted({r["retention_asked"] for r in ok if r["retention_asked"] is not None})
    table = [("rows", len(ok)), ("asked", ", ".join(f"{a:g}" for a in asked) or "n/a"),
             ("achieved mean", f"{np.mean(achieved):.4f}" if achieved else "n/a"),
             ("achieved min / max", f"{min(achieved):.4f} / {max(achieved):.4f}" if achieved else "n/a")]
    if not achieved:
        return "Retention achieved", None, table
    fig, axes = _figure(1)
    axes[0].hist(achieved, bins=min(30, max(5, len(achieved) // 2)))
    for a in asked:
        axes[0].axvline(a, color="red", ls="--", label=f"asked {a:g}")
    axes[0].set(xlabel="layer-averaged visual-token retention", ylabel="rows", title="retention achieved per row")
    axes[0].legend()
    return "Retention achieved", _png(fig), table


def error_reasons(records: list[dict]) -> Counter:
    """(stage, reason) -> error rows; the reason is the message without the file name and numbers,
    so one cause over many files is one bar. Skipped rows count under ('skipped', reason)."""
    counts: Counter = Counter()
    for r in records:
        if r["status"] == "error":
            counts[(r["error_stage"] or "?", _reason(r["error"]))] += 1
        elif r["status"] == "skipped":
            counts[("skipped", _reason(r["skip_reason"]))] += 1
    return counts


def errors(records: list[dict]) -> tuple[str, bytes | None, list]:
    counts = error_reasons(records)
    table = [(f"{stage}: {reason}", n) for (stage, reason), n in counts.most_common()]
    if not counts:
        return "Errors by stage and reason", None, [("errors", "none: every row is ok")]
    fig, axes = _figure(1, height=max(2.5, 0.45 * len(counts) + 1), width=9.0)
    labels = [f"{stage}: {reason[:45]}" for (stage, reason), _ in counts.most_common()][::-1]
    axes[0].barh(labels, [n for _, n in counts.most_common()][::-1])
    axes[0].set(xlabel="rows", title="error and skipped rows")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    return "Errors by stage and reason", _png(fig), table


def cost(summary: dict[str, Any]) -> tuple[str, bytes | None, list]:
    if summary["accelerator"] == "cpu":
        table = [("accelerator", "CPU run: no GPU-hours, no cost"),
                 ("video-hours per CPU-hour", _num(summary["video_hours_per_cpu_hour"])),
                 ("CPU-hours", _num(summary["cpu_hours"]))]
    else:
        table = [("video-hours per GPU-hour", _num(summary["video_hours_per_gpu_hour"])),
                 ("GPU-hours", _num(summary["gpu_hours"])),
                 ("cost per video-hour (USD)", _num(summary["cost_per_video_hour_usd"])),
                 ("at run.gpu_hourly_usd", _num(summary["gpu_hourly_usd"]))]
    table += [("video seconds processed", f"{summary['video_seconds_processed']:.1f}"),
              ("prefill FLOPs saved", "n/a" if summary["flops_saved_fraction"] is None
               else f"{100 * summary['flops_saved_fraction']:.1f} %")]
    return "Cost per video-hour", None, table


# --- helpers ------------------------------------------------------------------------------------


def _per_clip(records: list[dict]) -> list[dict]:
    """One record per clip (a QA clip has a row per question)."""
    return list({r["clip_id"]: r for r in records}.values())


def _reason(message: str | None) -> str:
    text = (message or "").split(": ", 1)[-1] if message and "/" in message.split(": ", 1)[0] else (message or "")
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text[:REASON_CHARS] or "(no message)"


def _time(value: Any) -> dt.datetime:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def _figure(columns: int, height: float = 3.2, width: float = 5.2):
    import matplotlib

    matplotlib.use("Agg")  # no display on a driver; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=(width * columns, height), squeeze=False)
    return fig, list(axes[0])


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _head(summary: dict[str, Any]) -> str:
    title = f"{summary['job']} / {summary['run_id']}"
    counts = f"{summary['rows_ok']} ok, {summary['rows_error']} error, {summary['rows_skipped']} skipped rows"
    model = summary["model_id"] + (" (random weights: text is noise)" if summary.get("model_random_weights") else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}</style></head><body>"
            f"<h1>Run report: {html.escape(title)}</h1><p>{html.escape(counts)}; model {html.escape(model)}; "
            f"retention asked {html.escape(str(summary.get('retention_asked_mean')))}; "
            f"started {html.escape(str(summary['started_at']))}, wall {summary['wall_s']:.1f} s; "
            f"output {html.escape(summary['output_uri'])}</p>")
