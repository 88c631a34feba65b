"""Sweeps: the grid (`grid`), training each group of runs as one vmapped run program (`run`), reports (`report`)."""
