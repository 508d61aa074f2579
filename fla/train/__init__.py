"""Trainer for the project's models, with flame's command line (``bash train.sh --job.config_file ... --training.*``).

``fla.train.config`` holds the job configuration (flame's sections, flags, TOML files and defaults). Nothing heavy is
imported here so that ``import fla.train`` stays cheap.
"""
