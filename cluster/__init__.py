"""shoulders cluster side: Ray Data ingest, the TorchTrainer, Tune, job submission and the CLI."""
