"""Test hooks for fault-injection tests: proof that a kill hit work, and a pause that lets a test kill it.

With ``$EQRLHF_TEST_MARKERS`` set to a directory (tests set it before the Ray nodes start, so every worker
inherits it), :func:`mark` writes one JSON file there per call, naming the place in the code, the Ray node, the
process and whatever the caller adds (rows, prompts, step). A test that removes a node reads them to show that
work was running on that node when it went, and afterwards that the work was redone elsewhere.

With ``$EQRLHF_TEST_HOLD`` set to a place name as well, the first process in the whole cluster that marks that
place stops there (sleeps up to ``$EQRLHF_TEST_HOLD_S`` seconds, default 600) after writing its marker, so the
test can remove its node mid-work instead of racing it; a ``held-<hold>`` file created atomically decides
which process holds, so the retried work goes through. ``<place>@<step>`` holds only the call whose ``step``
is that step (training marks every step at one place, and a test wants the kill at a chosen one). Unset
(always, outside tests), both cost one lookup.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

MARKERS_ENV, HOLD_ENV, HOLD_S_ENV = "EQRLHF_TEST_MARKERS", "EQRLHF_TEST_HOLD", "EQRLHF_TEST_HOLD_S"


def mark(place: str, **info) -> None:
    folder = os.environ.get(MARKERS_ENV)
    if not folder:
        return
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    # a callable value is called only here, with markers on: a hot loop passes ``ids=lambda: ...`` and pays
    # for the id list only in tests
    info = {key: value() if callable(value) else value for key, value in info.items()}
    record = {"place": place, "node_id": node, "pid": os.getpid(), "time": time.time(), **info}
    name = f"{place}-{node}-{os.getpid()}-{time.time_ns()}.json"
    tmp = Path(folder) / f".{name}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.rename(Path(folder) / name)  # whole or absent: a reader polling the folder never sees half a file
    hold = os.environ.get(HOLD_ENV)
    if hold and hold in (place, f"{place}@{info.get('step')}"):
        try:
            fd = os.open(Path(folder) / f"held-{hold}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # someone held here already: the redone work goes through
        os.write(fd, name.encode())
        os.close(fd)
        time.sleep(float(os.environ.get(HOLD_S_ENV, "600")))


def read_markers(folder: Path, place: str | None = None) -> list[dict]:
    """The markers in ``folder`` (of ``place`` only, when given), oldest first."""
    found = [json.loads(p.read_text()) for p in Path(folder).glob("*.json") if not p.name.startswith(".")]
    return sorted((m for m in found if place is None or m["place"] == place), key=lambda m: m["time"])


def held_marker(folder: Path, hold: str) -> dict | None:
    """The marker of the process that holds at ``hold`` (the value of ``$EQRLHF_TEST_HOLD``), or None while
    nobody does: the holder creates ``held-<hold>`` first, then writes its marker's name into it."""
    held = Path(folder) / f"held-{hold}"
    name = held.read_text() if held.is_file() else ""
    return json.loads((Path(folder) / name).read_text()) if name else None
