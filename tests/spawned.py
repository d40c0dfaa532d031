"""Targets of processes that tests start with the "spawn" method.

A spawned child imports its target by module name. Test modules are imported by pytest's
importlib mode under names the child cannot import, so the targets live here: tests/ is on
pytest's pythonpath, and a spawned child inherits sys.path."""


def read_row(examples, i, queue):
    """Read row ``i`` of a pickled Examples in the child: its left texts and weight."""
    queue.put((examples.left_texts(i), float(examples.weights[i])))
