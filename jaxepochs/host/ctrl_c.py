"""A Ctrl-C before a run holds its workdir: noted by the `jaxepochs` command from its first line, and acted on
where nothing is lost.

Python's own handler raises KeyboardInterrupt wherever the interpreter happens to be. In the first seconds that
is an import of JAX or orbax (a raw traceback) or a callback that swallows it (JAX's garbage-collection hook:
"Exception ignored in ..."; the run then trained to the end). The command installs `listen` before it imports
anything heavy; the run (or sweep) checks `pressed` before it touches its workdir, and its own handler
(host/driver.stop_on_ctrl_c) starts out stopped when a Ctrl-C came before it. No JAX here: it is imported first.
"""

from __future__ import annotations

import signal
import sys

_pressed: list[bool] = []


def _on_sigint(signum, frame) -> None:
    if not _pressed:
        print("jaxepochs: Ctrl-C: stopping before the run starts.", file=sys.stderr)
    _pressed.append(True)


def listen() -> None:
    """From now until a run installs its own handler, a Ctrl-C is noted (and said), not raised."""
    signal.signal(signal.SIGINT, _on_sigint)


def pressed() -> bool:
    return bool(_pressed)


def stop_if_pressed(what: str) -> None:
    """KeyboardInterrupt, saying that nothing was written, if a Ctrl-C came before `what` started."""
    if _pressed:
        print(f"jaxepochs: stopped before {what} started; nothing was written.", file=sys.stderr)
        raise KeyboardInterrupt


def stop_if_nothing_trained(epochs_done: int, stop, say) -> None:
    """A Ctrl-C while the program compiled, before any epoch: KeyboardInterrupt, with no outputs (they would
    describe an untrained model as a finished run); the next run of the command starts afresh."""
    if stop() and not epochs_done:
        say("Stopped before the first epoch: nothing trained; run the command again to start.")
        raise KeyboardInterrupt
