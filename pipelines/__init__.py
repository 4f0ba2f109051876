"""The application layer: the `mose` command and the pipelines it runs (`mose demo`, the `mose curate` composition).

Nothing in the library packages (common, mose, datasets_cfg, curation, training, eval) imports this package.
"""
