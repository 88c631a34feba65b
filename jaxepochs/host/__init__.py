"""The host: config, workdir, checkpoints, the cadence of calls and checkpoints, the host loop (`driver`), a
run's stages (`run`), its outputs (`report`) and the command line (`cli`)."""
