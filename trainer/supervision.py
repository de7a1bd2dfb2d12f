"""Workers never outlive their launcher. torchrun starts each worker in a session of its own, so when its agent is
killed with SIGKILL (a node's OOM killer, an impatient user) nothing stops the workers: they stay, stuck in a
collective and holding their memory (a GPU on a cluster), until someone finds them.

At startup a worker under torchrun asks Linux to SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG), then
checks that the parent is still the agent, since the agent may have died before the request was made. A no-op
outside torchrun and where prctl is unavailable (not Linux).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Set by launch/torchrun.sh to the agent's pid (it execs the agent), so the check below is exact there.
AGENT_PID_ENV = "NORMTRON_AGENT_PID"


def exit_with_launcher() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set): die with the agent; exit now if it is already gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    # The signal is armed for the parent we have now; if that is no longer the agent (we were re-parented to init
    # or a subreaper before arming it), the agent is gone already.
    expected = os.environ.get(AGENT_PID_ENV)
    if os.getppid() != parent or parent == 1 or (expected and expected.isdigit() and int(expected) != parent):
        print(f"normtron: the torchrun agent of this worker (pid {expected or parent}) is gone; exiting",
              file=sys.stderr)
        os._exit(1)
