"""Failures a user can act on, each with its exit code. Anything else exits 1."""


class PipelineError(Exception):
    """Base: the message is one line (or a short table) that names what to fix."""

    exit_code = 1


class ConfigError(PipelineError):
    """A variable, path or model the user gave is wrong."""

    exit_code = 2


class DataError(PipelineError):
    """The dataset cannot be used as it is."""

    exit_code = 3


class ResourceError(PipelineError):
    """Out of memory or out of disk."""

    exit_code = 4


class Interrupted(PipelineError):
    """SIGTERM/SIGINT arrived; a complete checkpoint was saved and `JOB=resume_training` continues."""

    exit_code = 75


class ParityError(PipelineError):
    """The merged model does not reproduce the adapter on its base."""

    exit_code = 1
