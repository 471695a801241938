"""Tasks: one module per ``model.task``, each implementing :class:`engine.tasks.base.Task`."""

from engine.tasks.base import DEFAULT_TASK, TASK_MODULES, Task, all_tasks, find_task, get_task, prompt_task

__all__ = ["DEFAULT_TASK", "TASK_MODULES", "Task", "all_tasks", "find_task", "get_task", "prompt_task"]
