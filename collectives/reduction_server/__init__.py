"""The reducer: a CPU-only process that sums the shards of a job's all-reduces.

Run it as ``collectives-reducer`` (or ``python -m collectives.reduction_server``): inside the
workers' mpirun job (``mpirun -np N python train.py : -np R collectives-reducer``), or on
its own with ``--rendezvous HOST:PORT`` beside workers that have COLLECTIVES_NUM_REDUCERS=R.
It joins one job (_join; the workers' side of that meeting is _meet), serves it with the
core's ReductionServer, and exits once every worker has closed. Workers use it through
``comm.allreduce``; nothing here imports a framework.
"""

from ._main import main

__all__ = ["main"]
