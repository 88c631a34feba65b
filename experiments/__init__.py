"""The shipped experiment modules (`--config experiments/NAME.py`) and, in references/, the published results the
studies reproduce. Installed with jaxepochs as `jaxepochs.experiments`."""
