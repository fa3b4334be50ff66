"""Errors meant for users: one sentence that names the thing and what to do; the CLI prints them without a traceback."""


class MiaotuiError(Exception):
    """Base class of every error a user can cause (bad model name, bad file, bad parameter)."""


class ModelFileError(MiaotuiError):
    """A model file is missing, truncated, corrupt or of a kind we cannot run."""


class EncoderModelError(ModelFileError):
    """The files hold an embedding model (an encoder) where a language model was asked for."""


class ModelSourceError(MiaotuiError):
    """A model name cannot be resolved to files (unknown alias, failed download)."""


class RequestFailed(MiaotuiError):
    """The engine failed one request (its data broke a step); the engine and the other requests went on."""


class ShuttingDown(RequestFailed):
    """The server's grace period ran out before this request finished; the client may retry elsewhere."""


class GrammarError(MiaotuiError, ValueError):
    """A structured-output constraint that does not compile (bad schema, regex or grammar, or too slow to)."""

    def __init__(self, message: str, param: str = "structured_output"):
        super().__init__(message)
        self.param = param
