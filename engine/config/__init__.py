"""The job: its typed schema (``schema``), the schema's sections (``sections``), reading a job file safely (``job_yaml``). Torch-free: the driver validates with it."""
