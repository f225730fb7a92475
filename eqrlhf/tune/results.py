"""The sweep's results: one row per trial, the Pareto front over the objectives, a table and a plot.

Written to the sweep dir: ``results.csv``, ``results.md``, ``pareto.png`` and ``manifest.json`` (the front,
counts, timings). A trial stopped early by the scheduler keeps the numbers of its last evaluation (a real
checkpoint) and takes part in the front; a failed trial is listed with its error and does not.
"""

from __future__ import annotations

import csv
from pathlib import Path

from eqrlhf.atomic import write_json
from eqrlhf.config import Config
from eqrlhf.tune.space import DIRECTIONS

METRIC_COLUMNS = ("harmful_compliance", "over_refusal", "helpfulness", "objective", "step", "total_steps")
PLOT = "pareto.png"


def trial_status(metrics: dict, error) -> str:
    if error is not None:
        return "error"
    if not metrics or metrics.get("step") is None:
        return "no result"
    done, planned = metrics.get("training_iteration", 0), metrics.get("planned_evaluations", 0)
    return "stopped early" if done < planned else "completed"


def collect_trials(grid, cfg: Config) -> list[dict]:
    """Plain rows from a Tune ResultGrid: trial id, sampled params, last reported metrics, status."""
    rows = []
    for index in range(len(grid)):
        result = grid[index]
        metrics = dict(result.metrics or {})
        row = {
            "trial": metrics.get("trial_id") or Path(result.path).name,
            "params": {k: (result.config or {}).get(k) for k in cfg.sweep.space},
            "status": trial_status(metrics, result.error),
            "evaluations": metrics.get("training_iteration", 0),
            "error": str(result.error).strip().splitlines()[-1] if result.error is not None else None,
            "run_dir": str(Path(result.path).parents[1] / "trials" / Path(result.path).name),
        }
        row.update({k: metrics.get(k) for k in (*METRIC_COLUMNS, *DIRECTIONS)})
        row["refusal"] = {k: v for k, v in metrics.items() if k.startswith("refusal/")}
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def mark_front(rows: list[dict], objectives: list[str]) -> list[int]:
    """Indices of non-dominated trials over the objectives (direction per metric); sets ``row['front']``."""
    from eqrlhf.evaluate.metrics import pareto_front

    points = [[r.get(m) if r["status"] != "error" else None for m in objectives] for r in rows]
    front = pareto_front(points, [DIRECTIONS[m] == "min" for m in objectives])
    for i, row in enumerate(rows):
        row["front"] = i in front
    return front


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_rows(rows: list[dict], space: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["trial", *space, *METRIC_COLUMNS, "evaluations", "status", "pareto"]
    body = [
        [
            r["trial"],
            *(_cell(r["params"].get(k)) for k in space),
            *(_cell(r.get(k)) for k in METRIC_COLUMNS),
            str(r["evaluations"]),
            r["status"],
            "yes" if r.get("front") else "",
        ]
        for r in rows
    ]
    return header, body


def write_csv(path: Path, header: list[str], body: list[list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(body)


def markdown(cfg: Config, header: list[str], body: list[list[str]], rows: list[dict]) -> str:
    lines = [
        f"# Sweep `{cfg.sweep.name}`",
        "",
        f"{len(rows)} trial(s); objectives {', '.join(f'{m} ({DIRECTIONS[m]})' for m in cfg.sweep.objectives)}; "
        f"helpfulness = {cfg.sweep.helpfulness}; early-stopping objective = "
        + " + ".join(f"{w:g} x {m}" for m, w in cfg.sweep.weights.items() if w)
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['trial']}: {r['error']}" for r in errors]
    lines += ["", f"![Pareto front]({PLOT})", ""]
    return "\n".join(lines)


def plot_front(rows: list[dict], cfg: Config, path: Path) -> None:
    """Harmful compliance vs over-refusal, colour = helpfulness; the front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.get("harmful_compliance") is not None and r.get("over_refusal") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    if shown:
        helpful = [r.get("helpfulness") for r in shown]
        colours = [h if h is not None else 0.0 for h in helpful]
        points = ax.scatter(
            [r["harmful_compliance"] for r in shown],
            [r["over_refusal"] for r in shown],
            c=colours,
            cmap="viridis",
            s=[90 if r.get("front") else 40 for r in shown],
            edgecolors=["black" if r.get("front") else "none" for r in shown],
            zorder=3,
        )
        fig.colorbar(points, ax=ax, label=f"helpfulness ({cfg.sweep.helpfulness})")
        front = sorted((r for r in shown if r.get("front")), key=lambda r: (r["harmful_compliance"], r["over_refusal"]))
        if len(front) > 1:
            xs, ys = [r["harmful_compliance"] for r in front], [r["over_refusal"] for r in front]
            ax.plot(xs, ys, color="black", linewidth=1, zorder=2, label="Pareto front")
            ax.legend(loc="upper right")
        for r in shown:
            ax.annotate(
                r["trial"][-5:],
                (r["harmful_compliance"], r["over_refusal"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax.set_xlabel("harmful compliance (lower is better)")
    ax.set_ylabel("over-refusal (lower is better)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"sweep {cfg.sweep.name}: {len(shown)} trial(s); outlined = Pareto front")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(cfg: Config, root: Path, rows: list[dict], seconds: float, resumed: bool) -> dict:
    front = mark_front(rows, list(cfg.sweep.objectives))
    space = list(cfg.sweep.space)
    header, body = table_rows(rows, space)
    write_csv(root / "results.csv", header, body)
    (root / "results.md").write_text(markdown(cfg, header, body, rows))
    plot_front(rows, cfg, root / PLOT)
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    manifest = {
        "stage": "sweep",
        "name": cfg.sweep.name,
        "config_hash": cfg.hash(),
        "dir": str(root),
        "trials": rows,
        "counts": counts,
        "pareto_front": [rows[i]["trial"] for i in front],
        "seconds": round(seconds, 1),
        "resumed": resumed,
        "files": {k: str(root / f) for k, f in (("csv", "results.csv"), ("markdown", "results.md"), ("plot", PLOT))},
    }
    front_text = "; ".join(
        f"{rows[i]['trial']} " + " ".join(f"{m}={_cell(rows[i].get(m))}" for m in cfg.sweep.objectives) for i in front
    )
    manifest["summary"] = (
        f"[sweep] {cfg.sweep.name}: {len(rows)} trial(s) {counts} in {seconds:.0f}s; "
        f"Pareto front: {front_text or 'none'}\n[sweep] table {root / 'results.md'}, plot {root / PLOT}"
    )
    write_json(root / "manifest.json", manifest, indent=1)
    return manifest
