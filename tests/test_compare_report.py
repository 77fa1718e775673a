"""The comparison report's helpers: mean ± sample std over seeds, missing metrics, the Markdown table."""

from __future__ import annotations

import math

import pytest

from ssl_lightning.eval.comparison import (
    Column,
    Run,
    aggregate,
    format_seconds,
    image_row,
    markdown_table,
    mean_std,
)

COLUMNS = [Column("Linear top-1 (%)", "linear"), Column("kNN top-1 (%)", "knn/k=200"),
           Column("Fine-tune top-1 (%)", "finetune")]


def metrics(linear: float, knn: float, finetune: float | None = None) -> dict:
    results = {"linear": {"top1": linear, "top5": 90.0}, "knn/k=200": {"top1": knn, "top5": 80.0, "k": 200}}
    if finetune is not None:
        results["finetune"] = {"top1": finetune, "top5": 95.0}
    return {"method": "X", "results": results}


RUNS = [
    Run("SimCLR", 0, 100.0, metrics(40.0, 30.0, 50.0)),
    Run("BYOL", 0, 130.0, metrics(35.0, 28.0)),
    Run("SimCLR", 1, 120.0, metrics(42.0, 33.0, 51.0)),
    Run("SimCLR", 2, 110.0, metrics(41.0, 30.0, 52.5)),
    Run("BYOL", 1, 150.0, metrics(36.0, 29.0, 45.0)),
]


def test_mean_std_is_the_sample_std() -> None:
    stat = mean_std([40.0, 42.0, 41.0])
    assert stat.mean == pytest.approx(41.0) and stat.n == 3
    # by hand: squared deviations 1 + 1 + 0 = 2, divided by n - 1 = 2 -> variance 1
    assert stat.std == pytest.approx(1.0)
    one = mean_std([7.5])
    assert one.mean == 7.5 and one.std is None and one.n == 1
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_aggregate_groups_by_method_in_order_and_computes_hand_checked_numbers() -> None:
    simclr, byol = aggregate(RUNS, COLUMNS)
    assert (simclr.method, simclr.seeds, byol.method, byol.seeds) == ("SimCLR", [0, 1, 2], "BYOL", [0, 1])
    assert simclr.pretrain_seconds.mean == pytest.approx(110.0) and simclr.pretrain_seconds.std == pytest.approx(10.0)
    knn = simclr.values["kNN top-1 (%)"]  # 30, 33, 30: mean 31, deviations -1, 2, -1 -> variance 6 / 2 = 3
    assert knn.mean == pytest.approx(31.0) and knn.std == pytest.approx(math.sqrt(3.0))
    assert simclr.values["Fine-tune top-1 (%)"].mean == pytest.approx(51.1666666, rel=1e-6)
    # BYOL's seed 0 has no fine-tuning result: the column is n/a rather than the mean of one seed
    assert byol.values["Fine-tune top-1 (%)"] is None
    assert byol.values["Linear top-1 (%)"].std == pytest.approx(math.sqrt(0.5))  # 35, 36


def test_markdown_table_has_a_row_per_method_and_the_columns() -> None:
    table = markdown_table(aggregate(RUNS, COLUMNS), COLUMNS)
    lines = table.strip().splitlines()
    assert lines[0] == ("| Method | Seeds | Pretraining (m:ss) | Linear top-1 (%) | kNN top-1 (%) | "
                        "Fine-tune top-1 (%) |")
    assert lines[1].count("|") == len(COLUMNS) + 4
    assert lines[2] == "| SimCLR | 3 | 1:50 ± 0:10 | 41.0 ± 1.0 | 31.0 ± 1.7 | 51.2 ± 1.3 |"
    assert lines[3] == "| BYOL | 2 | 2:20 ± 0:14 | 35.5 ± 0.7 | 28.5 ± 0.7 | n/a |"
    assert len(lines) == 4


def test_one_seed_shows_the_mean_alone_and_times_read_as_minutes() -> None:
    table = markdown_table(aggregate([Run("MAE", 0, 61.4, metrics(30.0, 25.25))], COLUMNS), COLUMNS)
    assert table.strip().splitlines()[2] == "| MAE | 1 | 1:01 | 30.0 | 25.2 | n/a |"
    assert format_seconds(0.4) == "0:00" and format_seconds(3599.6) == "60:00"
    with pytest.raises(ValueError, match="seconds"):
        format_seconds(float("nan"))


def test_image_row_puts_images_side_by_side() -> None:
    row = image_row({"SimCLR": "tsne/simclr.png", "MAE": "tsne/mae.png"})
    assert row.splitlines() == ["| SimCLR | MAE |", "|:---:|:---:|",
                                "| ![SimCLR](tsne/simclr.png) | ![MAE](tsne/mae.png) |"]
    assert image_row({}) == ""
