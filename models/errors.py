"""Errors meant for the user: the CLI and the server print their message and nothing else."""


class MeshserveError(Exception):
    """Base of every error whose message is a complete, user-facing explanation."""


class ConfigError(MeshserveError, ValueError):
    """A config (model, mesh, serving) that cannot be used; the message names the field."""


class ConvertError(MeshserveError):
    """A source model that cannot be imported (missing, truncated, unsupported)."""


class CheckpointError(MeshserveError):
    """A checkpoint folder that cannot be written or read."""


class RequestError(MeshserveError, ValueError):
    """A generation request that cannot be served (empty prompt, bad sampling value…); names the field."""
