"""``python -m ssl_lightning.cli``: the same as the ``ssl-lightning`` console script."""

from ssl_lightning.cli import main

main()
