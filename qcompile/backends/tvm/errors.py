"""The tvm backend's own error: what it cannot lower yet (the lowest module of the package: the
passes, the converters and the backend all raise it)."""
from __future__ import annotations

from ...errors import BackendError


class NotBuiltError(BackendError, NotImplementedError):
    """A capability the TVM backend does not have yet; the message names it and the node.

    Example::

        >>> try:
        ...     qcompile.lower(qmodel, backend="tvm", family="sme")
        ... except NotBuiltError as e:
        ...     print(e)    # kernel family 'sme' is not built (built: amx, vnni, ...)
    """
