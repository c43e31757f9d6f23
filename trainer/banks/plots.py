"""Figures of banks and checkpoints: classifier weight norms against class size, and a grid
of query images with their nearest neighbours (matplotlib imported lazily, Agg canvas).
"""
from __future__ import annotations

import numpy as np

from ..metrics import shot_split
from .files import Bank, BankError
from .runs import open_split

def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_weight_norms(norms, class_counts, path: str, title: str = "", many: int = 100,
                      few: int = 20) -> str:
    fig = _figure((8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    for name, ids in shot_split(class_counts, many=many, few=few).items():
        if ids:
            ax.bar(ids, [norms[c] for c in ids], color=colors[name],
                   label=f"{name}-shot ({len(ids)})")
    ax.set_xlabel("class (training images, head first)")
    ax.set_ylabel("classifier weight norm ||w_c||")
    twin = ax.twinx()
    twin.plot(range(len(class_counts)), class_counts, "k.--", label="training images")
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)")
    ax.legend(loc="lower left", framealpha=0.9)
    ax.set_title(title or "per-class classifier weight norms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def bank_source(bank: Bank):
    """Re-open the dataset a bank was extracted from (for showing its images)."""
    spec = bank.header.get("dataset") or {}
    data_cfg = bank.header.get("data_config")
    if not data_cfg:
        raise BankError(f"{bank.path}: the header has no data_config, so its images cannot be "
                        f"shown (banks not made by extract)")
    dataset, _ = open_split(data_cfg, spec["split"], spec.get("list"))
    if len(dataset) != bank.header["count"]:
        raise BankError(f"{bank.path}: the dataset now has {len(dataset)} samples, the bank "
                        f"{bank.header['count']}: it changed since extraction")
    return dataset.source


def as_image(img) -> np.ndarray:
    """uint8 CHW tensor or PIL image -> HxW or HxWx3 array for imshow."""
    arr = np.asarray(img.numpy().transpose(1, 2, 0) if hasattr(img, "numpy") else img)
    return arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr


def plot_neighbor_grid(results: list[dict], query: Bank, ref: Bank, path: str,
                       class_names=None) -> str:
    """One row per query: the query image, then its neighbours, titled label / distance;
    neighbours of another class are framed red."""
    qsrc, rsrc = bank_source(query), bank_source(ref)
    k = max(len(r["neighbors"]) for r in results)
    fig = _figure((1.6 * (k + 1), 1.8 * len(results)))
    name = (lambda c: class_names[c]) if class_names else str
    for i, r in enumerate(results):
        cells = [(qsrc.load(int(query.indices[r["row"]])), f"query {name(r['label'])}", "black")]
        cells += [(rsrc.load(int(ref.indices[n["row"]])),
                   f"{name(n['label'])} d={n['distance']:.3g}",
                   "green" if n["label"] == r["label"] else "red") for n in r["neighbors"]]
        for j, (img, text, color) in enumerate(cells):
            ax = fig.add_subplot(len(results), k + 1, i * (k + 1) + j + 1)
            arr = as_image(img)
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
            ax.set_title(text, fontsize=7, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_color(color)
                side.set_linewidth(2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
