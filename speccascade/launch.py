"""Several processes for one command (Lightning Fabric): ``log-traces`` and ``evaluate`` split their work across them.

Each process runs the whole command; ranks other than 0 are started by Fabric's launcher and share rank 0's output
directory (:func:`speccascade.outdir.launched_child`). They meet only at barriers around their shares.
"""

from __future__ import annotations

from datetime import timedelta

RANK_WAIT = timedelta(hours=24)  # how long a rank that finished its share waits at a barrier for the others


def launch(accelerator: str, devices: int, num_nodes: int):
    """A launched Fabric for ``devices`` processes on each of ``num_nodes`` nodes (one process: no launcher)."""
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy(devices * num_nodes))
    fabric.launch()
    return fabric


def strategy(processes: int):
    """DDP for several processes, with a wait of :data:`RANK_WAIT`: the ranks meet only before and after their
    shares, and one share can take far longer than another (reply lengths, outcome labels), past the collectives'
    default of 30 minutes, which ended healthy runs. A rank that dies closes its connections, so the others
    fail at once rather than wait it out."""
    if processes == 1:
        return "auto"
    from lightning_fabric.strategies import DDPStrategy

    return DDPStrategy(timeout=RANK_WAIT)
