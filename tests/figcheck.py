"""Text that collides in a rendered figure: every visible text's box, rotation included."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.text import Text


def _corners(t: Text, renderer) -> np.ndarray:  # noqa: ANN001
    """The four corners (pixels) of a text's rotated box, shrunk by half a pixel."""
    box = Text.get_window_extent(t, renderer)  # an annotation's text, without its arrow
    angle = t.get_rotation()
    if angle % 90 == 0 and angle % 180 == 0:
        w, h = box.width, box.height
    elif angle % 180 == 90:
        w, h = box.height, box.width
    else:
        t.set_rotation(0)
        flat = Text.get_window_extent(t, renderer)
        t.set_rotation(angle)
        w, h = flat.width, flat.height
    w, h = max(w - 1, 0), max(h - 1, 0)
    th = math.radians(angle)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    c = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2 @ rot.T
    return c + np.array([box.x0 + box.width / 2, box.y0 + box.height / 2])


def _separated(a: np.ndarray, b: np.ndarray) -> bool:
    """Separating-axis test for two convex quadrilaterals."""
    for poly in (a, b):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() <= pb.min() or pb.max() <= pa.min():
                return True
    return False


def drawn_texts(fig: Figure) -> list[Text]:
    """Draw the figure; every non-empty text that was drawn (titles, labels, tick labels,
    legends, annotations, colorbar labels)."""
    drawn: list[Text] = []
    draw = Text.draw

    def record(self: Text, renderer) -> None:  # noqa: ANN001
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        draw(self, renderer)

    Text.draw = record
    try:
        fig.canvas.draw()
    finally:
        Text.draw = draw
    return list(dict.fromkeys(drawn))


def _box(bbox) -> np.ndarray:  # noqa: ANN001
    return np.array(
        [[bbox.x0, bbox.y0], [bbox.x1, bbox.y0], [bbox.x1, bbox.y1], [bbox.x0, bbox.y1]]
    )


def overlaps(fig: Figure) -> list[tuple[str, str]]:
    """What a reader would stumble on once the figure is drawn as saved: two texts whose boxes
    overlap, a text over another axes (a title running over its colorbar, a label over the
    next panel), or a legend over plotted data (a line's points or a scatter's markers)."""
    found = drawn_texts(fig)
    renderer = fig.canvas.get_renderer()
    items = [(t, _corners(t, renderer)) for t in found]
    bad = []
    for i, (t1, c1) in enumerate(items):
        for t2, c2 in items[i + 1 :]:
            if not _separated(c1, c2):
                bad.append((t1.get_text(), t2.get_text()))
    for t, c in items:
        for ax in fig.axes:
            if ax is t.axes or not ax.get_visible() or ax.get_legend() is t.axes:
                continue
            if _owned_by(t, ax):
                continue
            inner = ax.get_window_extent(renderer).shrunk(0.98, 0.98)
            if not _separated(c, _box(inner)):
                bad.append((t.get_text(), f"<axes {ax.get_label() or ax.get_title()!r}>"))
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None or not legend.get_visible():
            continue
        frame = legend.get_window_extent(renderer)
        for pts in _data_points(ax):
            if any(frame.contains(x, y) for x, y in pts):
                bad.append(("<legend>", f"<data of {ax.get_title()!r}>"))
                break
    return bad


def _owned_by(t: Text, ax) -> bool:  # noqa: ANN001
    """Whether a text belongs to ``ax`` (its title, labels, ticks, legend, annotations)."""
    legend = ax.get_legend()
    owners = [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
    owners += ax.get_xticklabels() + ax.get_yticklabels() + ax.texts
    owners += legend.get_texts() + [legend.get_title()] if legend is not None else []
    return any(t is o for o in owners)


def _data_points(ax) -> list[np.ndarray]:  # noqa: ANN001
    """Display coordinates of each line's and each scatter's points in ``ax``."""
    out = []
    for ln in ax.get_lines():
        xy = ln.get_transform().transform(ln.get_xydata())
        if len(xy) > 1 and ln.get_linestyle() not in ("None", "", " "):  # along the segments
            t = np.linspace(0, 1, 20)[:, None]
            xy = np.concatenate([a + t * (b - a) for a, b in zip(xy[:-1], xy[1:], strict=True)])
        out.append(xy)
    for coll in ax.collections:
        offsets = coll.get_offsets()
        if len(offsets):
            out.append(coll.get_offset_transform().transform(offsets))
    return out
