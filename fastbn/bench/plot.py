"""The speed table as a picture: ``python -m fastbn --plot FILE``.

One panel per layout: the time fastbn takes against PyTorch's (fastbn / PyTorch, lower is
better, log scale) against the input size in bytes (log scale), one line per operation;
parity is the dashed line at 1. It needs matplotlib (``pip install "fastbn[plot]"``).
"""
import numpy as np

from .table import OPS

NEEDS = "--plot needs matplotlib: pip install 'fastbn[plot]' (or: pip install matplotlib)"


def available():
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def formats():
    """The file formats (extensions) matplotlib can write here."""
    from matplotlib.backend_bases import FigureCanvasBase
    return set(FigureCanvasBase.get_supported_filetypes())


def plot(rows, path, title, dtype=np.float32):
    """Draw the fastbn / PyTorch ratio of every timed row against its input size; write the
    figure to `path` (its extension picks the format: .png, .svg, .pdf)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    itemsize = np.dtype(dtype).itemsize
    layouts = [L for L in ("NCHW", "NHWC") if any(r.get("layout") == L for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(layouts)), figsize=(6 * max(1, len(layouts)), 4.5),
                             sharey=True, squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        for op, marker in zip(OPS, "os^"):
            pts = sorted((int(np.prod(r["shape"])) * itemsize, r["vs_torch"])
                         for r in rows if r.get("op") == op and r["layout"] == layout
                         and np.isfinite(r.get("vs_torch", np.nan)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                        label=op)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input size (bytes)")
        ax.set_title(layout)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("fastbn time / PyTorch time (lower is better)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
