"""The host: config, workdir, checkpoints, the cadence of calls and checkpoints, the host loop (`driver`), what a
config makes of the core (`setup`), a run's stages (`run`) and its outputs (`report`)."""
