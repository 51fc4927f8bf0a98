"""Run by tests/test_reliability.py: ``vsd-run`` whose checkpoint save of one step stops between
the data file and its checksum, so a test can kill the process while a checkpoint is written.

    python tests/reliability_worker.py PAUSE_STEP MARKER_FILE <vsd-run arguments...>

When step PAUSE_STEP is saved, ``checkpoints/step_<PAUSE_STEP>.pt`` is already in place and its
``.sha256`` is not: MARKER_FILE is written (holding that checksum's path) and the process sleeps
until it is killed.
"""

import sys
import time
from pathlib import Path

import vsd.core.checkpoint as checkpoint
from vsd.cli.main import main

pause_step, marker, *argv = sys.argv[1:]
sidecar_name = f"step_{int(pause_step):08d}.pt.sha256"
atomic_write = checkpoint._atomic_write


def paused_write(path: Path, data: bytes) -> None:
    if Path(path).name == sidecar_name:
        Path(marker).write_text(str(path))
        time.sleep(300)
    atomic_write(path, data)


checkpoint._atomic_write = paused_write
sys.exit(main(argv))
