"""The ``cdm`` command line (top layer: imports everything, nothing imports it)."""
