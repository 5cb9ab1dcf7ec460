"""Tasks that ship with the package, usable from a config file (``task.factory``)."""
