"""Figures of the visual reports: small PNG files drawn with matplotlib's Agg canvas.

Every function draws one figure with the object-oriented API (no ``pyplot`` state, no
interactive backend), writes it atomically as PNG and returns its path. Volumes are
3-D arrays in RAS voxel order (first axis left to right, second posterior to anterior,
third inferior to superior); axial slices are shown with anterior up and the subject's
left on the left of the picture (neurological convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "classifier_figure",
    "difference_figure",
    "kde_figure",
    "mosaic_figure",
    "registration_figure",
    "site_kde_figure",
]

#: Resolution of every figure (dots per inch).
DPI = 90
#: Most voxels a kernel density estimate is fitted to.
KDE_MAX_SAMPLES = 20000
#: Seed of the voxel subsample of the density estimates.
KDE_SEED = 0
_GRID_POINTS = 256


def _figure(width: float, height: float):
    """A figure attached to an Agg canvas (independent of the global matplotlib backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically; parent folders are created."""
    from ..harmonize.checkpoint import write_bytes_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    # A 256-colour palette keeps every colour map and grey scale (256 levels) and makes the
    # files several times smaller than matplotlib's RGBA output.
    image = Image.fromarray(np.ascontiguousarray(rgb)).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    write_bytes_atomically(path, lambda handle: image.save(handle, format="PNG", optimize=True,
                                                          dpi=(DPI, DPI)))
    return path


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, slice, slice]:
    """Slices of the smallest box around ``mask`` (the whole grid when it is empty)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def _axial_slices(mask: np.ndarray, n_slices: int) -> list[int]:
    """``n_slices`` axial slice indices spread over the brain (the inner 80% of the mask)."""
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    lo, hi = (int(z[0]), int(z[-1])) if z.size else (0, mask.shape[2] - 1)
    span = hi - lo
    picks = np.linspace(lo + 0.1 * span, hi - 0.1 * span, n_slices)
    return sorted({round(float(v)) for v in picks})


def _montage(volume: np.ndarray, slices: Sequence[int], box: tuple[slice, slice, slice]) -> np.ndarray:
    """Axial slices of ``volume`` cropped to ``box``, side by side (anterior up)."""
    return np.concatenate([volume[box[0], box[1], z].T[::-1] for z in slices], axis=1)


def _robust_limits(values: Sequence[np.ndarray], low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Percentile limits of the finite values of several arrays together."""
    pooled = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values]) if values else np.zeros(0)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(pooled, [low, high]))
    if vmax <= vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def _interpolation(panel: np.ndarray, width_inches: float) -> str:
    """Nearest neighbour when the panel is shown enlarged, anti-aliasing when it is shrunk."""
    return "nearest" if panel.shape[1] <= width_inches * DPI else "antialiased"


def mosaic_figure(
    path: Path,
    rows: Sequence[tuple[str, np.ndarray]],
    mask: np.ndarray,
    *,
    n_slices: int = 7,
    cmap: str = "gray",
    limits: tuple[float, float] | None = None,
    colorbar_label: str | None = None,
    title: str | None = None,
) -> Path:
    """Axial mosaics of several volumes on one shared intensity scale, one row per volume.

    Parameters
    ----------
    path : Path
        PNG file to write.
    rows : sequence of (str, numpy.ndarray)
        Row label and 3-D volume (all of the shape of ``mask``).
    mask : numpy.ndarray
        Brain mask (bool): sets the slices, the crop and the robust grey scale
        (0.5th to 99.5th percentile of all rows' voxels inside it).
    n_slices : int, default=7
        Number of axial slices.
    cmap : str, default="gray"
        Colour map.
    limits : (float, float), optional
        Fixed colour limits instead of the robust ones (e.g. ``(0, 1)`` for FA).
    colorbar_label : str, optional
        Draw a colour bar with this label.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
    """
    mask = np.asarray(mask, dtype=bool)
    box = _bounding_box(mask)
    slices = _axial_slices(mask, n_slices)
    if limits is None:
        limits = _robust_limits([np.asarray(volume)[mask] for _, volume in rows])
    panels = [(label, _montage(np.asarray(volume, dtype=np.float32), slices, box)) for label, volume in rows]
    height, width = panels[0][1].shape
    fig_width = 9.0
    row_height = max(fig_width * height / width, 0.6)
    fig = _figure(fig_width, row_height * len(panels) + (0.35 if title else 0.1))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    image = None
    for ax, (label, panel) in zip(axes, panels):
        image = ax.imshow(panel, cmap=cmap, vmin=limits[0], vmax=limits[1],
                          interpolation=_interpolation(panel, fig_width), aspect="equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.9 if colorbar_label else 0.99, top=0.9 if title else 0.98,
                        bottom=0.02, hspace=0.04)
    if colorbar_label and image is not None:
        bar = fig.colorbar(image, ax=list(axes), fraction=0.025, pad=0.01)
        bar.set_label(colorbar_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return _save(fig, path)


def difference_figure(
    path: Path,
    before: np.ndarray,
    after: np.ndarray,
    mask: np.ndarray,
    *,
    n_slices: int = 7,
    title: str | None = None,
) -> Path:
    """Axial mosaic of ``after - before`` inside ``mask`` on a symmetric diverging scale.

    The limits are +/- the 99th percentile of the absolute difference inside the mask;
    voxels outside the mask are grey.

    Returns
    -------
    Path
    """
    import matplotlib

    mask = np.asarray(mask, dtype=bool)
    diff = np.asarray(after, dtype=np.float32) - np.asarray(before, dtype=np.float32)
    inside = np.abs(diff[mask])
    inside = inside[np.isfinite(inside)]
    bound = float(np.percentile(inside, 99.0)) if inside.size else 1.0
    bound = bound if bound > 0 else 1.0
    shown = np.where(mask, diff, np.nan)
    box = _bounding_box(mask)
    panel = _montage(shown, _axial_slices(mask, n_slices), box)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.82")
    height, width = panel.shape
    fig = _figure(9.0, max(9.0 * height / width, 0.6) + (0.45 if title else 0.2))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(panel, cmap=cmap, vmin=-bound, vmax=bound, interpolation=_interpolation(panel, 9.0),
                      aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.9, top=0.85 if title else 0.97, bottom=0.03)
    bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    bar.set_label("harmonized - preprocessed", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return _save(fig, path)


def registration_figure(
    path: Path,
    image: np.ndarray,
    brain_mask: np.ndarray,
    white_matter: np.ndarray,
    *,
    title: str | None = None,
) -> Path:
    """Sagittal, coronal and axial views of ``image`` with template contours drawn on it.

    Parameters
    ----------
    path : Path
        PNG file to write.
    image : numpy.ndarray
        3-D image on the template grid.
    brain_mask, white_matter : numpy.ndarray
        Template brain-mask fraction and white-matter probability on the same grid
        (contoured at 0.5).
    title : str, optional
        Figure title.

    Returns
    -------
    Path
    """
    from matplotlib.lines import Line2D

    image = np.asarray(image, dtype=np.float32)
    brain = np.asarray(brain_mask, dtype=np.float32)
    wm = np.asarray(white_matter, dtype=np.float32)
    inside = brain > 0.5
    centre = [round(float(c)) for c in np.argwhere(inside).mean(axis=0)] if inside.any() else \
        [n // 2 for n in image.shape]
    vmin, vmax = _robust_limits([image[inside] if inside.any() else image])
    views = [
        ("sagittal", lambda v: v[centre[0], :, :]),
        ("coronal", lambda v: v[:, centre[1], :]),
        ("axial", lambda v: v[:, :, centre[2]]),
    ]
    fig = _figure(9.0, 3.3 if title else 3.0)
    axes = fig.subplots(1, 3)
    for ax, (name, cut) in zip(axes, views):
        plane = cut(image).T
        ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation=_interpolation(plane, 3.0))
        for volume, colour in ((brain, "#ff3b30"), (wm, "#00c8ff")):
            outline = cut(volume).T
            if outline.min() < 0.5 < outline.max():
                ax.contour(outline, levels=[0.5], colors=colour, linewidths=0.9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=8)
    handles = [Line2D([], [], color="#ff3b30", label="template brain mask"),
               Line2D([], [], color="#00c8ff", label="template white matter")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.84 if title else 0.9, bottom=0.1, wspace=0.03)
    return _save(fig, path)


def _subsample(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size > KDE_MAX_SAMPLES:
        values = rng.choice(values, KDE_MAX_SAMPLES, replace=False)
    return values


def _density(samples: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian kernel density of ``samples`` on ``grid``; ``None`` when it cannot be fitted."""
    from scipy.stats import gaussian_kde

    if samples.size < 2 or np.ptp(samples) <= 0:
        return None
    try:
        return gaussian_kde(samples)(grid)
    except (np.linalg.LinAlgError, ValueError):
        return None


_KDE_STYLES = {
    0: {"color": "#4c72b0", "linestyle": "-"},
    1: {"color": "#dd8452", "linestyle": "-"},
    2: {"color": "black", "linestyle": "--"},
}


def kde_figure(
    path: Path,
    panels: Sequence[tuple[str, Mapping[str, np.ndarray]]],
    *,
    xlabel: str = "intensity",
) -> Path:
    """Kernel density estimates of intensities, one panel per entry, one curve per sample set.

    Each sample set is subsampled to at most :data:`KDE_MAX_SAMPLES` values (seeded) and
    fitted with :class:`scipy.stats.gaussian_kde`; sets with fewer than two distinct values
    are left out.

    Parameters
    ----------
    path : Path
        PNG file to write.
    panels : sequence of (str, mapping of str to numpy.ndarray)
        Panel title and ``{curve label: samples}`` (e.g. voxels inside the brain mask,
        or evenly spaced quantiles of a target-site profile).
    xlabel : str, default="intensity"
        Label of the x axes.

    Returns
    -------
    Path
    """
    rng = np.random.default_rng(KDE_SEED)
    fig = _figure(min(4.5 * len(panels), 9.0) if panels else 4.5, 2.6)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (panel_title, sets) in zip(axes, panels):
        samples = {label: _subsample(values, rng) for label, values in sets.items()}
        samples = {label: values for label, values in samples.items() if values.size}
        lo, hi = _robust_limits(list(samples.values()), 0.1, 99.9)
        pad = 0.05 * (hi - lo)
        grid = np.linspace(lo - pad, hi + pad, _GRID_POINTS)
        drawn = 0
        for index, (label, values) in enumerate(samples.items()):
            density = _density(values, grid)
            if density is None:
                continue
            ax.plot(grid, density, label=label, linewidth=1.4, **_KDE_STYLES.get(index, {}))
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
        if drawn:
            ax.legend(fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.2, wspace=0.15)
    return _save(fig, path)


def site_kde_figure(
    path: Path,
    kdes: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    *,
    methods: Sequence[str] | None = None,
    target_site: str | None = None,
    title: str | None = None,
) -> Path:
    """Per-site intensity densities, one panel per method, one curve per site, shared x axis.

    Parameters
    ----------
    path : Path
        PNG file to write.
    kdes : mapping
        ``{method: {site: {"x": [...], "density": [...]}}}`` (precomputed curves).
    methods : sequence of str, optional
        Panel order; methods of ``kdes`` not listed come after, in their order.
    target_site : str, optional
        Drawn with a thicker line and marked "(target)".
    title : str, optional
        Figure title.

    Returns
    -------
    Path
    """
    import matplotlib

    order = [m for m in (methods or []) if m in kdes] + [m for m in kdes if m not in (methods or [])]
    sites = sorted({site for method in order for site in (kdes[method] or {})})
    palette = matplotlib.colormaps["tab10"]
    colours = {site: palette(i % 10) for i, site in enumerate(sites)}
    ncols = 2 if len(order) > 1 else 1
    nrows = max(int(np.ceil(len(order) / ncols)), 1)
    fig = _figure(9.0 if ncols == 2 else 5.0, 2.1 * nrows + (0.5 if title else 0.3))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
    for ax, method in zip(axes, order):
        for site in sites:
            curve = (kdes[method] or {}).get(site)
            if not curve:
                continue
            x = np.asarray(curve.get("x") or [], dtype=float)
            y = np.asarray(curve.get("density") or [], dtype=float)
            if x.size == 0 or x.size != y.size:
                continue
            is_target = site == target_site
            ax.plot(x, y, color=colours[site], linewidth=2.2 if is_target else 1.2,
                    label=f"{site} (target)" if is_target else site)
        ax.set_title(method, fontsize=9)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=7, frameon=False)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=9)
    for ax in axes[len(order):]:
        ax.set_visible(False)
    for ax in axes[max(len(order) - ncols, 0):len(order)]:
        ax.set_xlabel("intensity", fontsize=8)
        ax.xaxis.set_tick_params(labelbottom=True)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.99, top=1.0 - 0.55 / fig.get_figheight() if title else 0.93,
                        bottom=0.32 / fig.get_figheight() + 0.05, hspace=0.35, wspace=0.06)
    return _save(fig, path)


def _number(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value


def classifier_figure(
    path: Path,
    rows: Sequence[Mapping],
    *,
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Bar chart of site-classifier accuracy per method, with each method's chance level.

    Parameters
    ----------
    path : Path
        PNG file to write.
    rows : sequence of mapping
        Rows with ``method``, ``accuracy`` and ``chance`` (and optionally
        ``balanced_accuracy``); missing numbers draw no bar.
    methods : sequence of str, optional
        Bar order; other methods come after.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
    """
    by_method = {str(row.get("method")): row for row in rows}
    order = [m for m in (methods or []) if m in by_method] + [m for m in by_method if m not in (methods or [])]
    fig = _figure(max(1.3 * len(order) + 1.8, 4.0), 2.8)
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(order))
    width = 0.38
    accuracy = np.array([_number(by_method[m].get("accuracy")) for m in order])
    balanced = np.array([_number(by_method[m].get("balanced_accuracy")) for m in order])
    ax.bar(positions - width / 2, np.nan_to_num(accuracy), width, color="#4c72b0", label="accuracy")
    if np.isfinite(balanced).any():
        ax.bar(positions + width / 2, np.nan_to_num(balanced), width, color="#8fb0d8", label="balanced accuracy")
    for pos, acc, bal in zip(positions, accuracy, balanced):
        if not np.isfinite(acc):
            ax.text(pos - width / 2, 0.02, "n/a", ha="center", fontsize=7)
    chance_drawn = False
    for pos, method in zip(positions, order):
        chance = _number(by_method[method].get("chance"))
        if np.isfinite(chance):
            ax.hlines(chance, pos - 0.48, pos + 0.48, colors="#c44e52", linestyles="--", linewidth=1.3,
                      label=None if chance_drawn else "chance")
            chance_drawn = True
    ax.set_xticks(positions)
    ax.set_xticklabels(order, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.1, right=0.76, top=0.88 if title else 0.95, bottom=0.15)
    return _save(fig, path)
