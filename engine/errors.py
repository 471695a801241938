"""User-facing errors: each says what was wrong, where, and how to fix it."""


class JobError(Exception):
    """A problem with a job (its file, a key, a data source, the model) found before training starts.

    The CLI prints the message as one paragraph and exits with code 2.
    """
