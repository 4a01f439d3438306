"""Data-parallel training in NumPy with synchronized Batch Normalization.

A small network, Batch Normalization -> ReLU -> global average pool -> linear ->
softmax cross-entropy, trained with SGD on batches split over the processes of
MPI.COMM_WORLD. Run it with any number of processes; the losses printed are those of
one process training on the whole batch (to float32 rounding)::

    mpiexec -n 4 python -m mpi4py data_parallel.py
"""
import numpy as np
from mpi4py import MPI

from fastbn.distributed import SyncBatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

N, C, H, W, CLASSES = 26, 16, 8, 8, 10        # the whole batch, whatever the process count
STEPS, LR = 8, 1.0

# Every process starts from the same parameters (the same seed), and keeps them equal:
# it applies the same all-reduced gradients.
init = np.random.default_rng(0)
bn = SyncBatchNorm(C, comm=comm)              # statistics of the whole batch
fc_w = (init.standard_normal((C, CLASSES)) * 0.1).astype(np.float32)
fc_b = np.zeros(CLASSES, np.float32)


def batches(steps):
    """Process 0 draws each whole batch and scatters one slice to every process (the
    slices may differ in size: np.array_split)."""
    data = np.random.default_rng(1)
    teacher = data.standard_normal((C, CLASSES))       # the labels depend on x
    for _ in range(steps):
        parts = None
        if rank == 0:
            x = (data.standard_normal((N, C, H, W)) * 2 + 1).astype(np.float32)
            labels = np.argmax(x.mean(axis=(2, 3)) @ teacher, axis=1)
            parts = list(zip(np.array_split(x, size), np.array_split(labels, size)))
        yield comm.scatter(parts, root=0)


for step, (x, labels) in enumerate(batches(STEPS)):
    n = len(labels)
    rows = np.arange(n)
    # forward: this process's slice, with the whole batch's statistics
    h = bn.forward(x)
    a = np.maximum(h, 0)
    pooled = a.mean(axis=(2, 3))                           # (n, C)
    logits = pooled @ fc_w + fc_b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = comm.allreduce(float(-np.log(p[rows, labels]).sum())) / N   # whole-batch mean

    # backward of the whole-batch mean loss, this process's share of it
    dlogits = p
    dlogits[rows, labels] -= 1
    dlogits /= N
    dfc_w = pooled.T @ dlogits
    dfc_b = dlogits.sum(axis=0)
    dpooled = dlogits @ fc_w.T
    dh = np.where(h > 0, dpooled[:, :, None, None] / (H * W), 0).astype(np.float32)
    bn.zero_grad()
    bn.backward(dh)                 # dx (returned) would flow on to the layers below

    # all-reduce every parameter gradient in one message, then the same SGD step everywhere
    grads = np.concatenate([bn.weight_grad, bn.bias_grad, dfc_w.ravel(), dfc_b])
    comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
    dw, db, dfw, dfb = np.split(grads, np.cumsum([C, C, C * CLASSES]))
    bn.weight -= LR * dw
    bn.bias -= LR * db
    fc_w -= LR * dfw.reshape(C, CLASSES)
    fc_b -= LR * dfb
    if rank == 0:
        print(f"step {step}: loss {loss:.6f} ({size} processes, slices of "
              f"{[len(s) for s in np.array_split(np.arange(N), size)]})")

# the running statistics are the same on every process: save them from any one
state = bn.state_dict()
if rank == 0:
    print("running_mean[:4]", np.round(state["running_mean"][:4], 5))
