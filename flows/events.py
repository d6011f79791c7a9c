"""The Prefect events skumatch emits, which deployment triggers in ``prefect.yaml`` start flows on.

``skumatch data add`` and ``skumatch data import`` announce a new data version with
:data:`DATA_ADDED`; the ``retrain`` deployment's trigger runs the flow on the announced folder.
"""

from __future__ import annotations

from pathlib import Path

DATA_ADDED = "skumatch.data.added"


def announce_data_version(folder: str | Path, dvc_hash: str) -> bool:
    """Emit :data:`DATA_ADDED` for a dataset folder and its DVC hash, and wait until it is sent.

    The resource id names the folder, so a trigger can follow one dataset
    (``skumatch.dataset.<absolute path>``); ``skumatch.data.path`` and ``skumatch.data.dvc_hash``
    carry what the run needs.

    Returns:
        Whether an event went out: False with no Prefect API configured (``PREFECT_API_URL``).
    """
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # Prefect would start a temporary server for the event, which no trigger listens to.
        return False
    path = str(Path(folder).resolve())
    event = emit_event(
        event=DATA_ADDED,
        resource={
            "prefect.resource.id": f"skumatch.dataset.{path}",
            "prefect.resource.name": Path(path).name,
            "skumatch.data.path": path,
            "skumatch.data.dvc_hash": dvc_hash,
        },
    )
    # Events go out from a background worker; a CLI process must not exit before it has sent them.
    EventsWorker.drain_all(timeout=30)
    return event is not None
