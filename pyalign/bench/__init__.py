"""The bench suite: ``python -m pyalign.bench`` (see ``--help``)."""
