"""The start of a run on the driver: its logs routed into the run folder, Ray started (or joined), the header printed."""

from __future__ import annotations

from typing import Any

from cluster.run.console import header_lines, ray_line, say
from cluster.run.driver_logs import route_driver_logs
from cluster.run.trainer import ensure_ray


def start_run(job: Any, info: Any, command: str = "train") -> list[str]:
    """Route this process's logs into the run folder, start (or join) Ray, and print the header:
    the job, the data, where Ray runs and where the logs are. Returns the lines printed."""
    route_driver_logs(job.output_dir)

    ensure_ray()
    lines = header_lines(job, info, ray_line(job))
    for line in lines:
        say(line)
    return lines
