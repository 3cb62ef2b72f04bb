"""User-facing errors.

Every error a user can cause is a :class:`DiffaccelError` whose message is one line that names what is wrong and
what to do next. The CLI prints it and exits with code 2; library callers catch it like any exception.
"""
from __future__ import annotations

import errno


class DiffaccelError(Exception):
    """An error caused by input, configuration or environment, with a one-line message that advises."""

    exit_code = 2


class SourceError(DiffaccelError):
    """The checkpoint (SRC) cannot be resolved or loaded."""


class ArtifactError(DiffaccelError):
    """An optimized artifact directory is missing, incomplete, modified or incompatible."""


class ShapeError(DiffaccelError, ValueError):
    """A requested batch/height/width lies outside what an engine was built for."""


class PipelineArgumentError(DiffaccelError, TypeError):
    """A keyword a drop-in pipeline's ``from_pretrained`` does not know, or knows but cannot honour."""


class MemoryBudgetError(DiffaccelError):
    """A build would need more memory than the machine (or --memory-limit) gives; refused before any work."""


class ParityError(DiffaccelError):
    """An exported or quantized component does not match PyTorch within tolerance."""


class BackendUnavailableError(DiffaccelError):
    """A backend or execution provider is not installed or cannot run on this machine."""


def one_line(text: str) -> str:
    """Collapse whitespace so a message always prints as a single line."""
    return " ".join(str(text).split())


def disk_full(e: OSError) -> "DiffaccelError | None":
    """The one-line error for a full disk (ENOSPC, EDQUOT); None for any other OSError. A stage that fails this way
    leaves only its ``.partial`` folder, which the next run replaces."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" while writing {e.filename}" if e.filename else ""
    return DiffaccelError(f"no space left on the device{where}: free disk space (df -h shows how much is left; an "
                          "SDXL U-Net build needs about 25 GB) and run the same command again; finished stages "
                          "are kept")
