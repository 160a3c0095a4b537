"""Errors that the CLI and the server turn into clear messages (never a traceback dump)."""


class MoemeshError(Exception):
    """Base class: the message is meant for the user as it is."""


class CheckpointError(MoemeshError):
    """A checkpoint file is missing, truncated or lacks a tensor; names the file and tensor."""


class UnsupportedArchitecture(MoemeshError):
    """The checkpoint's model_type (or GGUF architecture) is not one we implement."""


class PromptTooLong(MoemeshError):
    """The prompt (plus requested tokens) does not fit the context window."""
