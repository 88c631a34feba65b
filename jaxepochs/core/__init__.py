"""The pure core: the epoch (`epoch`), the optimizer and schedules (`optim`), early stopping (`early_stopping`)
and the run program that advances a batch of runs by K epochs (`program`). No I/O, no config objects."""
