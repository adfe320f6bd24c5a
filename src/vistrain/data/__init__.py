"""Data sets, transforms, pipelines and loaders."""
