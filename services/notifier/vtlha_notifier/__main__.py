"""``python -m vtlha_notifier``: the same as ``vtlha-notifier``."""

from vtlha_notifier.main import main

main()
