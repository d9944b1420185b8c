"""The task endpoints' pure parts: the task list for the web page, and checking the `auto` router task.

`POST /api/tasks/<task>` takes and answers the MQTT API's JSON (mqtt/messages.py). `POST /api/infer` with
`"task": "auto"` first asks the router, a classify task whose labels are task names (prompts/route.yaml):
one label-logit pass over a cached prefix, a few tens of milliseconds, then the chosen task runs.
"""

from __future__ import annotations

from ..tasks import ClassifyTask
from .messages import ApiError, Tasks


def describe(tasks: Tasks) -> list[dict]:
    return [{"name": name, "kind": task.kind, "description": task.description,
             **({"labels": list(task.labels)} if isinstance(task, ClassifyTask) else {})}
            for name, task in sorted(tasks.items())]


def router_error(tasks: Tasks, router: str) -> ApiError | None:
    """Why `auto` cannot route, or None. Every label of the router must name another task."""
    task = tasks.get(router)
    if not isinstance(task, ClassifyTask):
        return ApiError("bad_request", f"task \"auto\" needs a classify task {router!r} whose labels are task "
                                       "names (http.router_task); there is none")
    unknown = sorted(label for label in task.labels if label not in tasks or label == router)
    if unknown:
        return ApiError("bad_request", f"the router task {router!r} has labels that are not tasks: "
                                       f"{', '.join(unknown)}")
    return None
