"""The one exception type for errors a user can fix; the CLI prints it without a traceback."""

import errno


class VituneError(Exception):
    """Bad input, a missing file, a wrong option: the message names the file/record/field and why."""


# OS errors a user fixes (space, permissions), reported as a message, not a traceback.
USER_FIXABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def describe_os_error(err: OSError) -> str:
    """A one-line explanation of a disk-full / permission error: what, where, and what to do."""
    where = err.filename or "a file"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing {where}: free some space and run the command again "
                "(finished outputs, checkpoints and caches are written whole and stay valid; training continues with --resume)")
    if err.errno == errno.EROFS:
        return f"cannot write {where}: the file system is read-only; choose another location"
    return f"permission denied: {where}; fix its permissions or choose another location"
