"""The exceptions of esc-stream: one root, `EscError`, and the few kinds a caller tells apart.

Every one carries a single-line message that names the file, option or device at fault. The library raises
them and never prints; each front end turns them into its own one-line form (`esc-video: ...` on stderr,
`vs.Error("esc.Upscale: ...")`, a message on the demo page). Each kind also subclasses the builtin it refines
(ValueError, RuntimeError), so callers that catch those keep working.
"""

from __future__ import annotations


class EscError(Exception):
    """Something a user can cause and fix: a bad argument, file, picture, video or device."""


class UserError(EscError, ValueError):
    """A bad argument or option (command-line flags, the VapourSynth filter's arguments, a demo control)."""


class MemoryBudgetError(UserError):
    """A frame or output size whose upscale would not fit in the memory available (esc_stream.budget); the
    message names the size, the estimate and a --tile that fits, or says that even tiles cannot."""


class CheckpointError(EscError, ValueError):
    """A file that cannot be used as an ESC checkpoint; the message names the file and the reason."""


class MediaError(EscError, ValueError):
    """A picture or video that cannot be read or written as asked; the message names the file or stream."""


class ImageError(MediaError):
    """A still image that cannot be read or written."""


class VideoError(MediaError):
    """A video file, pipe or URL that cannot be read or written."""


class DeviceError(EscError, ValueError):
    """A device (or an inference back-end on it) that cannot be used here; the message says why."""


class BackendError(DeviceError):
    """An inference back-end that cannot run here or with these settings."""


class ExportError(EscError, RuntimeError):
    """A model that could not be exported (ONNX) or whose export does not match the network."""


__all__ = [
    "BackendError",
    "CheckpointError",
    "DeviceError",
    "EscError",
    "ExportError",
    "ImageError",
    "MediaError",
    "MemoryBudgetError",
    "UserError",
    "VideoError",
]
