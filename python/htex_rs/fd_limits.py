"""Open-file limits for the submit process and the worker pool. Each connected pool holds
a TCP connection (one file descriptor) in the submit process, and each worker a stream,
a pidfd and pipes in its pool; distributions ship a soft RLIMIT_NOFILE of 1024 (Parsl
#2165: trouble near 500 blocks). Both raise the soft limit to the hard one at start, and
say once, with the fix, when even the hard limit cannot cover what may connect."""
from __future__ import annotations

import logging
import resource

logger = logging.getLogger(__name__)

#: Descriptors kept for everything else a process opens (logs, libzmq, Python).
RESERVE = 256
_warned: set[str] = set()


def raise_nofile(needed: int, what: str) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn once per ``what`` if the hard
    limit is below ``needed`` + RESERVE. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # an "unlimited" hard limit is over the kernel's nr_open
            logger.debug("could not raise RLIMIT_NOFILE to %s: %s", hard, e)
    limit = hard if hard != resource.RLIM_INFINITY else None
    if limit is not None and limit < needed + RESERVE and what not in _warned:
        _warned.add(what)
        logger.warning(
            "%s may need %d open files but the hard limit (ulimit -Hn) is %d: connections past "
            "it fail with 'Too many open files'. Raise it where this runs: `ulimit -Hn %d` in the "
            "job script or worker_init (as root, or in /etc/security/limits.conf: nofile), or "
            "LimitNOFILE= for a systemd service", what, needed + RESERVE, limit, needed + RESERVE)
    return soft
