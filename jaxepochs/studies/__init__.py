"""Reproductions of published results: they use the trainer; the trainer does not know them."""
