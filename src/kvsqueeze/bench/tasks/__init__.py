"""Benchmark tasks. Importing this package registers every built-in task: each module here other than `base` holds
one task family, so adding a task is adding a file."""

import importlib
import pkgutil

from kvsqueeze.bench.tasks.base import TASKS, Sample, Task, get_task, list_tasks, register_task

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["TASKS", "Sample", "Task", "get_task", "list_tasks", "register_task"]
