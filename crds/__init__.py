"""Package data only: the CustomResourceDefinitions, readable with importlib.resources."""
