"""The progress bar moves on short epochs (e.g. 39 steps of a DDP epoch with refresh_rate 50)."""

from ssl_lightning.callbacks import LogFriendlyProgressBar


def updates(bar: LogFriendlyProgressBar, total: int) -> list[int]:
    return [step for step in range(1, total + 1) if bar._should_update(step, total)]


def test_short_epochs_refresh_every_tenth_and_long_ones_at_the_configured_rate() -> None:
    bar = LogFriendlyProgressBar(refresh_rate=50)
    assert updates(bar, 39) == [4, 8, 12, 16, 20, 24, 28, 32, 36, 39]  # Lightning's bar: [39] only
    assert updates(bar, 1000)[:3] == [50, 100, 150] and updates(bar, 1000)[-1] == 1000
    assert updates(bar, 5) == [1, 2, 3, 4, 5]


def test_a_disabled_bar_never_updates() -> None:
    bar = LogFriendlyProgressBar(refresh_rate=0)
    assert updates(bar, 39) == []
