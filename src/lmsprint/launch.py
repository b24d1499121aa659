"""``lmsprint train --nproc N``: run the same command as N processes on this node through torchrun's own launcher.

It is exactly ``torchrun --standalone --nproc-per-node N -m lmsprint train ...`` (``torch.distributed.run``,
i.e. torchelastic's ``elastic_launch``), with ``--nproc`` taken out of the relaunched arguments. Several nodes:
call ``torchrun`` itself (``docs/distributed.md``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lmsprint import distributed as D
from lmsprint.errors import ConfigError


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the workers must not launch again)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_args(nproc: int, argv: Sequence[str]) -> list[str]:
    """The ``torch.distributed.run`` command line that starts ``python -m lmsprint ARGV`` as ``nproc`` processes."""
    return ["--standalone", "--nnodes=1", f"--nproc-per-node={nproc}", "--module", "lmsprint", *strip_nproc(argv)]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Start ``nproc`` workers running ``lmsprint ARGV`` (minus ``--nproc``) and wait for them.

    Workers inherit this environment with :data:`lmsprint.distributed.SAFE_ENV` set (no NVLink multicast).

    Returns:
        0, or the exit code of the first worker that failed.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--nproc starts its own processes; under torchrun leave it out (torchrun's "
                          "--nproc-per-node sets the count)")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    D.apply_safe_env()
    try:
        run(parse_args(torchrun_args(nproc, argv)))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode  # the root cause, not the lowest rank (often SIGTERMed by torchrun)
        return 128 - code if code < 0 else (code or 1)  # killed by signal N: 128 + N, as a shell reports it
    except SignalException as e:  # Ctrl-C / SIGTERM: torchrun forwarded it, the workers checkpointed and exited
        return 128 + int(e.sigval)
    return 0
