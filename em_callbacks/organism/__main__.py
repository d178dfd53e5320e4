"""``python -m em_callbacks.organism``: the multi-seed study (see ``study.py``)."""

from .study import main

main()
