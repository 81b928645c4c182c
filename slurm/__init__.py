"""SLURM launchers (submitit): pretraining across nodes and evaluation sweeps; a local cluster for tests."""
