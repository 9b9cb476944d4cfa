"""`megatron-dapo plot RUN_DIR`: PNG curves of the main metrics from a run's metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from megatron_dapo.metrics.sinks import read_metrics

PANELS = (
    ("reward", ("critic/score_mean", "critic/acc_mean")),
    ("validation", ("val/acc_avg@", "val/pass@", "val/maj@")),
    ("response length", ("response_length/mean", "response_length/max")),
    ("entropy", ("actor/entropy",)),
    ("clip fractions", ("actor/pg_clipfrac_high", "actor/pg_clipfrac_low")),
    ("dynamic sampling", ("sampling/gen_batches", "sampling/groups_dropped_all_correct",
                          "sampling/groups_dropped_all_wrong", "sampling/groups_dropped_unscored")),
    ("trainer vs engine", ("rollout/probe_logp_mean_diff", "rollout/probe_logp_max_diff",
                           "rollout/trainer_logp_max_diff")),
    ("grad norm", ("actor/grad_norm",)),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/metrics.png (or `out`); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (title, prefixes) in zip(axes.flat, PANELS):
        keys = sorted({k for row in rows for k in row if any(k.startswith(p) for p in prefixes)})
        for key in keys:
            points = curve(rows, key)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None,
                    label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if keys:
            ax.legend(fontsize=7)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def curve(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in step order: a trainer.val_only row for step N follows the training's later rows
    in the file."""
    return sorted(((row["step"], row[key]) for row in rows if key in row), key=lambda point: point[0])
