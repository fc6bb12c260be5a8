"""Console scripts of detr-irpe (one module per command; see ``[project.scripts]``)."""
