"""Tasks and metrics, the trace schema, and the trace writer and reader."""

from .tasks import TASKS, Example, Task, get_task
from .traces import load_traces, read_manifest

__all__ = ["TASKS", "Example", "Task", "get_task", "load_traces", "read_manifest"]
