"""Reporting: what a pipeline's runs produced, as tables, an HTML index and a README.

The third of the pipeline's steps (`plan` -> `run` -> `report`): the per-invocation summary
(summary.csv/json), the headline table (baseline vs AU-guided, or a comparison notebook's rows),
the collection of training runs for ablations (notebook 03), HTML renderings of the executed
notebooks, and results/index.html + results/README.md. Every number is read from a run's
metrics.json at the ONE key path that `fer_lib.metrics.HEADLINE_PATHS` gives it.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import nbformat
import pandas as pd

from fer_lib.metrics import HEADLINE_PATHS, INTERVAL_PATHS, METRICS_FILE, headline_number, interval_at, metric_at
from fer_lib.utils import ConfigError, atomic_write_json, atomic_write_text, git_revision
from fer_lib.workflow.plan import DEFAULT_RESULTS, MARKER, read_marker

if TYPE_CHECKING:
    from fer_lib.workflow.run import RunResult

SUMMARY_COLUMNS = ["stage", "run_id", "status", "duration_s", "error", "run_dir"]
STATUSES = ("ok", "skipped", "failed", "blocked")
HEADLINE_COLUMNS = ["model", "backbone", "lambda", "layers", "accuracy", "macro_f1", "ATT-COS", "CAM-COS",
                    "shortcut_acc", "cue_energy", "train_time_s"]
#: headline column -> the key of headline.json (results/<experiment>/headline.json)
HEADLINE_JSON_KEYS = {"accuracy": "accuracy", "macro_f1": "macro_f1", "ATT-COS": "att_cos", "CAM-COS": "cam_cos",
                      "shortcut_acc": "shortcut_accuracy", "cue_energy": "cue_energy"}
#: metrics with a 95% interval in training runs: columns <metric>_low, <metric>_high (NaN for older runs)
INTERVAL_METRICS = tuple(INTERVAL_PATHS["training"])
TRAINING_COLUMNS = ["run", "backbone", "au_weight", "layers", "tapped", "seed", "accuracy", "macro_f1", "att_cos",
                    "cam_cos", "train_time_s", "n_test",
                    *(f"{m}_{end}" for m in INTERVAL_METRICS for end in ("low", "high"))]


# --------------------------------------------------------------------------- summaries of one invocation


def write_summary(exp_dir: Path, results: Sequence["RunResult"], elapsed: float) -> None:
    """summary.csv and summary.json of this invocation's runs (status counts, wall time, git revision)."""
    frame = pd.DataFrame([r.as_row() for r in results], columns=SUMMARY_COLUMNS)
    counts = {s: int((frame["status"] == s).sum()) for s in STATUSES}
    atomic_write_text(exp_dir / "summary.csv", frame.to_csv(index=False))
    atomic_write_json(exp_dir / "summary.json", {
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(), "wall_time_s": round(elapsed, 1), "counts": counts,
        "runs": [r.as_row() for r in results]})


def format_summary(results: Sequence["RunResult"]) -> str:
    """A plain-text table of the runs of this invocation and the status counts."""
    if not results:
        return "no runs selected"
    frame = pd.DataFrame([r.as_row() for r in results])[["stage", "run_id", "status", "duration_s", "error"]]
    frame["error"] = frame["error"].str.slice(0, 90)
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return frame.to_string(index=False) + "\n" + ", ".join(f"{v} {k}" for k, v in counts.items())


# --------------------------------------------------------------------------- metrics collection


def _hidden(path: Path, root: Path) -> bool:
    """True for paths inside hidden folders (.superseded-*, .ipynb_checkpoints) below root."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _run_markers(exp_dir: Path) -> list[Path]:
    """The run.json files of an experiment folder (<stage>/<run-id>/run.json), hidden folders excluded."""
    return sorted(p for p in exp_dir.glob(f"*/*/{MARKER}") if not _hidden(p, exp_dir))


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None




def _number(record: Mapping[str, Any] | None, path: str) -> float | None:
    """The headline number at one key path of a metrics record (None where absent or not a number)."""
    return headline_number(metric_at(record, path))


def training_headline_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One row of headline numbers from a training metrics.json (kind "training", `HEADLINE_PATHS`), with
    the 95% interval of each metric of `INTERVAL_PATHS` as <metric>_low / <metric>_high (None if absent)."""
    paths = HEADLINE_PATHS["training"]
    config = metrics.get("config") or {}
    layers = config.get("layers")
    att = metric_at(metrics, "test.att_cos")
    return {
        "backbone": config.get("backbone"),
        "au_weight": config.get("au_weight"),
        "layers": "+".join(map(str, layers)) if isinstance(layers, (list, tuple)) else layers,
        "tapped": "+".join(att) if isinstance(att, Mapping) else None,
        "seed": config.get("seed"),
        **{key: _number(metrics, paths[key]) for key in ("accuracy", "macro_f1", "att_cos", "cam_cos", "train_time_s")},
        "n_test": metric_at(metrics, paths["n_test"]),
        **{f"{key}_{end}": (ci[i] if ci else None) for key, path in INTERVAL_PATHS["training"].items()
           for ci in [interval_at(metrics, path)] for i, end in enumerate(("low", "high"))},
    }


def collect_training_runs(root: str | os.PathLike) -> pd.DataFrame:
    """One row per training run (a metrics.json with `config` and `test`) found under `root`.

    A run folder counts once: metrics.json files nested inside an accepted run folder (notebook 02
    keeps the trainer's own copy in <run>/run/) are ignored, and so are runs whose run.json says
    they did not finish and hidden folders (.superseded-*).
    """
    root = Path(root)
    rows = []
    accepted: list[Path] = []
    paths = sorted(root.rglob(METRICS_FILE), key=lambda p: (len(p.parts), str(p))) if root.exists() else []
    for path in paths:
        if _hidden(path, root) or any(parent in accepted for parent in path.parents):
            continue
        metrics = _load_json(path)
        if not metrics or "config" not in metrics or "test" not in metrics:
            continue
        marker = read_marker(path.parent) or {}
        if marker and marker.get("status") not in (None, "ok"):
            continue
        accepted.append(path.parent)
        rows.append({"run": str(path.parent.relative_to(root)) or ".", **training_headline_row(metrics)})
    return pd.DataFrame(rows, columns=TRAINING_COLUMNS).sort_values("run").reset_index(drop=True)


def ablation_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each metric, per backbone, tapped layers and lambda.

    Where the runs hold 95% intervals (<metric>_low/_high; older runs do not): the mean of the runs'
    bounds, i.e. that run's interval when a group has one run (the spread over seeds is <metric>_std).
    """
    if runs.empty:
        raise ConfigError("no training runs to summarise (no metrics.json with config and test)")
    metrics = [m for m in ("accuracy", "macro_f1", "att_cos", "cam_cos", "train_time_s") if runs[m].notna().any()]
    grouped = runs.groupby(["backbone", "layers", "au_weight"], dropna=False)[metrics]
    table = grouped.mean()
    std = grouped.std(ddof=0).add_suffix("_std")
    table = table.join(std)
    bounds = [f"{m}_{end}" for m in metrics if m in INTERVAL_METRICS for end in ("low", "high")
              if f"{m}_{end}" in runs and runs[f"{m}_{end}"].notna().any()]
    if bounds:
        table = table.join(runs.groupby(["backbone", "layers", "au_weight"], dropna=False)[bounds].mean())
    table["n_runs"] = grouped.size()
    return table.reset_index().sort_values(["backbone", "layers", "au_weight"]).reset_index(drop=True)




def _interval(record: Mapping[str, Any] | None, path: str | None) -> list[float] | None:
    """A [low, high] interval at one key path as a list (None where absent or not two numbers)."""
    found = interval_at(record, path) if path else None
    return None if found is None else list(found)


def headline_table(baseline: Mapping[str, Any] | None, guided: Mapping[str, Any] | None,
                   interpret: Mapping[str, Any] | None = None, shortcut: Mapping[str, Any] | None = None
                   ) -> pd.DataFrame:
    """Baseline vs AU-guided: accuracy, macro-F1, ATT-COS, CAM-COS, shortcut accuracy and cue energy, each with
    its 95% interval in a `<column>_ci` column where the run measured one.

    Training numbers come from the training runs' metrics.json; `interpret` (notebook 04's) gives
    CAM-COS at <role>.cam_cos, and ATT-COS at <role>.att_cos_mean where training measured none;
    `shortcut` (notebook 10's) the clean accuracy of the model trained with the spurious cue and its
    attention energy on the cue.
    """
    rows = []
    paths, cut, spread = HEADLINE_PATHS["interpret"], HEADLINE_PATHS["shortcut"], INTERVAL_PATHS
    for role, label, metrics in (("baseline", "baseline", baseline), ("guided", "AU-guided", guided)):
        if not metrics:
            continue
        row = training_headline_row(metrics)
        cis = {"accuracy_ci": _interval(metrics, spread["training"]["accuracy"]),
               "macro_f1_ci": _interval(metrics, spread["training"]["macro_f1"]),
               "ATT-COS_ci": _interval(metrics, spread["training"]["att_cos"]), "CAM-COS_ci": None}
        if interpret:
            cam = _number(interpret, paths["cam_cos"].format(role=role))
            if cam is not None:
                row["cam_cos"] = cam
                cis["CAM-COS_ci"] = _interval(interpret, spread["interpret"]["cam_cos"].format(role=role))
            if row["att_cos"] is None:
                row["att_cos"] = _number(interpret, paths["att_cos"].format(role=role))
        short = {"shortcut_acc": None, "cue_energy": None, "shortcut_acc_ci": None, "cue_energy_ci": None}
        if shortcut:
            for col, key in (("shortcut_acc", "shortcut_accuracy"), ("cue_energy", "cue_energy")):
                short[col] = _number(shortcut, cut[key].format(role=role))
                short[f"{col}_ci"] = _interval(shortcut, spread["shortcut"][key].format(role=role))
        rows.append({"model": label, "backbone": row["backbone"], "lambda": row["au_weight"],
                     "layers": row["layers"], "accuracy": row["accuracy"], "macro_f1": row["macro_f1"],
                     "ATT-COS": row["att_cos"], "CAM-COS": row["cam_cos"], **short, **cis,
                     "train_time_s": None if row["train_time_s"] is None else round(row["train_time_s"], 1)})
    ci_columns = [f"{c}_ci" for c in HEADLINE_JSON_KEYS]
    return pd.DataFrame(rows, columns=HEADLINE_COLUMNS + ci_columns)


def headline_record(exp_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The content of results/<experiment>/headline.json: per role ("baseline", "guided") accuracy, macro_f1,
    att_cos, cam_cos, shortcut_accuracy and cue_energy (each with `<key>_ci` where measured), the set's ceiling
    (`oracle_accuracy`, from the baseline's training data), and the wall time and git revision of the pipeline
    invocation that finished last (`runs_skipped` > 0: some runs came from an earlier invocation)."""
    exp_dir = Path(exp_dir)
    table = experiment_headline(exp_dir)
    info = _load_json(exp_dir / "experiment.json") or {}
    refs = info.get("headline") or {}
    if table is None or refs.get("comparison"):
        return None
    summary = _load_json(exp_dir / "summary.json") or {}
    record: dict[str, Any] = {}
    for role, label in (("baseline", "baseline"), ("guided", "AU-guided")):
        rows = table[table["model"] == label]
        if rows.empty:
            continue
        row = rows.iloc[0]
        entry: dict[str, Any] = {}
        for col, key in HEADLINE_JSON_KEYS.items():
            entry[key] = headline_number(row[col])
            if row[f"{col}_ci"] is not None:
                entry[f"{key}_ci"] = row[f"{col}_ci"]
        record[role] = entry
    base = _load_json(exp_dir / refs["baseline"] / "metrics.json") if refs.get("baseline") else None
    record["oracle_accuracy"] = _number(base, HEADLINE_PATHS["training"]["oracle_accuracy"])
    record["wall_time_s"] = summary.get("wall_time_s")
    record["git_revision"] = summary.get("git_revision")
    record["runs_skipped"] = (summary.get("counts") or {}).get("skipped")
    return record


def write_headline(exp_dir: str | os.PathLike) -> Path | None:
    """Write headline.json (`headline_record`) into the experiment folder; None where it declares no pair."""
    record = headline_record(exp_dir)
    return None if record is None else atomic_write_json(Path(exp_dir) / "headline.json", record)


def _comparison_cam(row: Mapping[str, Any]) -> float | None:
    """A comparison row's CAM-COS: `cam_cos` (notebook 08 writes it); results written before it did have only
    cam_cos_<method> columns, whose first (the headline method) stands in for them."""
    if row.get("cam_cos") is not None:
        return headline_number(row["cam_cos"])
    cams = [v for k, v in row.items() if k.startswith("cam_cos_") and v is not None]
    return headline_number(cams[0]) if cams else None


def comparison_headline(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The headline rows of a comparison notebook's metrics.json (notebook 08: `comparison` records, one
    per evaluated checkpoint, peer included), in the columns of `headline_table`."""
    rows = []
    for rec in metric_at(metrics, HEADLINE_PATHS["comparison"]["rows"]) or []:
        train_time = _number(rec, "train_time_s")
        rows.append({"model": rec.get("model"), "backbone": rec.get("backbone"), "lambda": rec.get("au_weight"),
                     "layers": None, "accuracy": rec.get("accuracy"), "macro_f1": rec.get("macro_f1"),
                     "ATT-COS": rec.get("att_cos"), "CAM-COS": _comparison_cam(rec),
                     "train_time_s": None if train_time is None else round(train_time, 1)})
    return pd.DataFrame(rows, columns=HEADLINE_COLUMNS)


def headline_split(exp_dir: str | os.PathLike) -> str:
    """Which split the headline numbers are measured on ("test set", or the comparison's own split)."""
    info = _load_json(Path(exp_dir) / "experiment.json") or {}
    ref = (info.get("headline") or {}).get("comparison")
    if not ref:
        return "test set"
    metrics = _load_json(Path(exp_dir) / ref / "metrics.json") or {}
    return str(metrics.get("split_label") or f"{metrics.get('dataset', '')} {metrics.get('split', '')}".strip())


def experiment_headline(exp_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The headline table of a finished experiment folder (None if it declares no headline)."""
    exp_dir = Path(exp_dir)
    info = _load_json(exp_dir / "experiment.json") or {}
    refs = info.get("headline") or {}
    if refs.get("comparison"):
        table = comparison_headline(_load_json(exp_dir / refs["comparison"] / "metrics.json") or {})
        return None if table.empty else table
    if not refs.get("baseline") and not refs.get("guided"):
        return None
    loaded = {k: _load_json(exp_dir / v / "metrics.json") for k, v in refs.items() if isinstance(v, str)}
    table = headline_table(loaded.get("baseline"), loaded.get("guided"), loaded.get("interpret"),
                           loaded.get("shortcut"))
    return None if table.empty else table


# --------------------------------------------------------------------------- rendering


def render_notebooks(exp_dir: str | os.PathLike, verbose: bool = True) -> list[Path]:
    """Render every executed notebook under exp_dir to HTML beside it (figures embedded); returns new files."""
    from nbconvert import HTMLExporter   # heavy (jinja2, bleach): only when rendering

    exp_dir = Path(exp_dir)
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    written = []
    for marker_path in _run_markers(exp_dir):
        marker = read_marker(marker_path.parent) or {}
        notebook = marker_path.parent / Path(marker.get("notebook", "")).name
        if not notebook.name.endswith(".ipynb") or not notebook.exists():
            continue
        target = notebook.with_suffix(".html")
        if target.exists() and target.stat().st_mtime >= notebook.stat().st_mtime:
            continue
        try:
            body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
        except Exception as exc:  # noqa: BLE001 - a broken notebook must not stop the index
            if verbose:
                print(f"could not render {notebook}: {exc}", file=sys.stderr)
            continue
        atomic_write_text(target, body)
        written.append(target)
    return written


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of a DataFrame (no extra dependency)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame) -> str:
    """A plain HTML table of a DataFrame."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for col in frame.columns:
            cells.append(f"<td>{html.escape(_fmt(row[col]))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _experiment_runs(exp_dir: Path) -> pd.DataFrame:
    info = _load_json(exp_dir / "experiment.json") or {}
    order = {s["output"]: i for i, s in enumerate(info.get("stages", []))}
    rows = []
    for marker_path in _run_markers(exp_dir):
        marker = read_marker(marker_path.parent) or {}
        run_dir = marker_path.parent
        rel = run_dir.relative_to(exp_dir.parent)
        notebook = Path(marker.get("notebook", "")).name
        metrics = _load_json(run_dir / "metrics.json") or {}
        summary = training_headline_row(metrics) if "test" in metrics else {}
        err = marker.get("error") or {}
        rows.append({
            "stage": run_dir.parent.name, "run": run_dir.name, "status": marker.get("status", "?"),
            "accuracy": summary.get("accuracy"), "ATT-COS": summary.get("att_cos"),
            "duration_s": marker.get("duration_s"), "git": marker.get("git_revision"),
            "finished": (marker.get("finished") or "")[:16].replace("T", " "),
            "error": f"{err.get('type', '')}: {err.get('message', '')}"[:160] if err else "",
            "_html": f"{rel}/{Path(notebook).stem}.html" if (run_dir / f"{Path(notebook).stem}.html").exists() else "",
            "_ipynb": f"{rel}/{notebook}" if notebook and (run_dir / notebook).exists() else "",
            "_metrics": f"{rel}/metrics.json" if (run_dir / "metrics.json").exists() else "",
            "_order": order.get(run_dir.parent.name, len(order)),
        })
    frame = pd.DataFrame(rows, columns=["stage", "run", "status", "accuracy", "ATT-COS", "duration_s", "git",
                                        "finished", "error", "_html", "_ipynb", "_metrics", "_order"])
    return frame.sort_values(["_order", "stage", "run"]).reset_index(drop=True)


def _runs_html(runs: pd.DataFrame) -> str:
    """The per-run table of the index page, with links to the rendered notebook and metrics."""
    head = "".join(f"<th>{c}</th>" for c in ("stage", "run", "status", "accuracy", "ATT-COS", "time (s)", "git",
                                              "finished", "files"))
    rows = []
    for _, row in runs.iterrows():
        target = row["_html"] or row["_ipynb"]
        run = html.escape(row["run"])
        run_cell = f'<a href="{html.escape(target)}">{run}</a>' if target else run
        files = [f'<a href="{html.escape(row[k])}">{label}</a>' for k, label in
                 (("_html", "html"), ("_ipynb", "ipynb"), ("_metrics", "metrics.json")) if row[k]]
        status = html.escape(row["status"])
        if row["error"]:
            status = f"<span class='failed' title='{html.escape(row['error'])}'>{status}</span>"
        cells = [html.escape(row["stage"]), run_cell, status, _fmt(row["accuracy"]), _fmt(row["ATT-COS"]),
                 _fmt(row["duration_s"]), html.escape(str(row["git"] or "")), html.escape(row["finished"]),
                 " ".join(files)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.4em;
font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#f2f2f2}
tr:nth-child(even) td{background:#fafafa}code{background:#f4f4f4;padding:0 .25em}h2{margin-top:2em;
border-bottom:1px solid #ddd}.failed{color:#b00020}.muted{color:#666;font-size:.9em}
.figures{display:flex;flex-wrap:wrap;gap:1em}.figures figure{margin:0;max-width:48%}.figures img{max-width:100%;
border:1px solid #ddd}figcaption{font-size:.8em;color:#666}"""


def write_index(results_root: str | os.PathLike = DEFAULT_RESULTS) -> tuple[Path, Path]:
    """Regenerate results/index.html and results/README.md from every experiment folder present."""
    results_root = Path(results_root)
    experiments = sorted(p for p in results_root.iterdir() if p.is_dir() and (p / "experiment.json").exists()) \
        if results_root.exists() else []
    html_parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fer_lib results</title>"
                  f"<style>{_CSS}</style></head><body><h1>fer_lib results</h1>"
                  "<p>Executed notebooks of the pipeline (<code>python -m fer_lib.workflow.pipeline</code>), rendered to HTML "
                  "with their figures. Each run folder also holds the executed <code>.ipynb</code>, its "
                  "<code>metrics.json</code> (stamped with seed, config and git revision) and <code>run.json</code>."
                  "</p>"]
    md = ["# Results", "",
          "Generated by `python -m fer_lib.workflow.pipeline` (do not edit by hand: the pipeline rewrites this file).",
          "Open [index.html](index.html) in a browser for the rendered notebooks with their figures.",
          "Each run folder `<experiment>/<stage>/<run-id>/` holds the executed notebook (`.ipynb` and `.html`),",
          "its `metrics.json` (stamped with seed, configuration and git revision), `run.json` (parameters,",
          "code version, status, duration) and `run.log` (the kernel's output).", ""]
    for exp_dir in experiments:
        info = _load_json(exp_dir / "experiment.json") or {}
        summary = _load_json(exp_dir / "summary.json") or {}
        name = html.escape(exp_dir.name)
        html_parts.append(f"<h2>{name}</h2><p>{html.escape(info.get('description', ''))}</p>")
        md += [f"## {exp_dir.name}", "", info.get("description", ""), ""]
        meta = (f"experiment file <code>{html.escape(str(info.get('source')))}</code>, seed {info.get('seed')}, "
                f"last pipeline run {html.escape(str(summary.get('finished', '?')))} at git revision "
                f"<code>{html.escape(str(summary.get('git_revision', '?')))}</code>, wall time "
                f"{summary.get('wall_time_s', 0):.0f} s")
        html_parts.append(f"<p class='muted'>{meta}</p>")
        md += [re.sub(r"</?code>", "`", meta) + ".", ""]
        headline = experiment_headline(exp_dir)
        if headline is not None:
            where = html.escape(headline_split(exp_dir))
            shown = shown_headline(headline)
            ceiling = headline_number((_load_json(exp_dir / "headline.json") or {}).get("oracle_accuracy"))
            if ceiling is not None:
                where += f"; the set's ceiling, an oracle on the true AU intensities: {ceiling:.3f}"
            html_parts.append(f"<h3>Headline: baseline vs AU-guided ({where})</h3>" + _html_table(shown)
                              + "<p class='muted'>Brackets: 95% intervals (accuracy: Wilson; the others: bootstrap "
                              "over test faces). shortcut_acc: clean test accuracy of the model trained with a "
                              "spurious cue; cue_energy: its attention's share on the cue.</p>")
            md += [f"### Headline: baseline vs AU-guided ({where})", "", markdown_table(shown), ""]
        figures = [f for f in (info.get("headline") or {}).get("figures") or [] if (exp_dir / f).is_file()]
        if figures:
            html_parts.append("<div class='figures'>" + "".join(
                f"<figure><a href='{html.escape(exp_dir.name + '/' + f)}'><img src='{html.escape(exp_dir.name + '/' + f)}' "
                f"alt='{html.escape(f)}'></a><figcaption>{html.escape(f)}</figcaption></figure>" for f in figures)
                + "</div>")
            md += [f"![{f}]({exp_dir.name}/{f})" for f in figures] + [""]
        runs = _experiment_runs(exp_dir)
        if runs.empty:
            continue
        html_parts.append("<h3>Runs</h3>" + _runs_html(runs))
        md += ["### Runs", "", "| stage | run | status | accuracy | ATT-COS | notebook | metrics |", "|---|---|---|---|---|---|---|"]
        for _, row in runs.iterrows():
            nb_link = f"[{'html' if row['_html'] else 'ipynb'}]({row['_html'] or row['_ipynb']})" \
                if (row["_html"] or row["_ipynb"]) else "-"
            if row["_html"] and row["_ipynb"]:
                nb_link += f" [ipynb]({row['_ipynb']})"
            met = f"[json]({row['_metrics']})" if row["_metrics"] else "-"
            status = row["status"] + (f" ({row['error']})" if row["error"] else "")
            md.append(f"| {row['stage']} | {row['run']} | {status.replace('|', '/')} | {_fmt(row['accuracy'])} | "
                      f"{_fmt(row['ATT-COS'])} | {nb_link} | {met} |")
        md.append("")
    if not experiments:
        html_parts.append("<p>No results yet: run <code>python -m fer_lib.workflow.pipeline</code>.</p>")
        md.append("No results yet: run `python -m fer_lib.workflow.pipeline`.")
    html_parts.append("</body></html>")
    index = atomic_write_text(results_root / "index.html", "\n".join(html_parts))
    readme = atomic_write_text(results_root / "README.md", "\n".join(md).rstrip() + "\n")
    return index, readme


def shown_headline(table: pd.DataFrame) -> pd.DataFrame:
    """The headline table as text cells: each score with its 95% interval ("0.931 [0.905, 0.952]"), '-' if absent;
    the columns no row measured (e.g. the shortcut test of an experiment without one) are left out."""
    shown = table.drop(columns=[c for c in table.columns if c.endswith("_ci") or c == "train_time_s"]).copy()
    shown["lambda"] = shown["lambda"].map(lambda v: f"{v:g}" if isinstance(v, (int, float)) else _fmt(v))
    for col in HEADLINE_JSON_KEYS:
        if col not in shown:
            continue
        if table[col].isna().all():
            shown = shown.drop(columns=[col])
            continue
        ci = table[f"{col}_ci"] if f"{col}_ci" in table else [None] * len(table)
        shown[col] = [_fmt(v) + (f" [{c[0]:.3f}, {c[1]:.3f}]" if isinstance(c, list) else "")
                      for v, c in zip(table[col], ci)]
    return shown


def format_headline(table: pd.DataFrame) -> str:
    """The headline table as aligned plain text (`shown_headline`)."""
    return shown_headline(table).to_string(index=False)
