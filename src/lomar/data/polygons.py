"""COCO polygons that reach far outside their image, clipped before pycocotools rasterises them.

pycocotools rasterises a polygon by walking each edge in steps of a fifth of a pixel, in 32-bit
integers: a vertex 1e7 px away costs about 2 s at every load of the image, and one past 4.3e8 px
(2**31 / 5) overflows and crashes the process (a segmentation fault, no message). A converter's
sentinel or a unit slip writes such vertices. A polygon with a vertex outside the image's own size
around it (x in [-W, 2W], y in [-H, 2H]) is clipped to that rectangle (Sutherland-Hodgman, each
crossing computed exactly in rationals, so no coordinate overflows): its part inside the image is
unchanged, and one that misses the rectangle altogether becomes three points at its corner, an empty
mask as before.
"""

from __future__ import annotations

from fractions import Fraction

__all__ = ["fit_polygons"]


def _clip(points: list[tuple], axis: int, limit: float, below: bool) -> list[tuple]:
    """``points`` (a closed polygon) clipped to the side of ``axis`` = ``limit`` that ``below`` names."""
    def inside(p) -> bool:
        return p[axis] <= limit if below else p[axis] >= limit

    def crossing(p, q) -> tuple:
        t = (Fraction(limit) - Fraction(p[axis])) / (Fraction(q[axis]) - Fraction(p[axis]))
        other = float(Fraction(p[1 - axis]) + t * (Fraction(q[1 - axis]) - Fraction(p[1 - axis])))
        return (float(limit), other) if axis == 0 else (other, float(limit))

    out = []
    for i, current in enumerate(points):
        previous = points[i - 1]
        if inside(current):
            if not inside(previous):
                out.append(crossing(previous, current))
            out.append(current)
        elif inside(previous):
            out.append(crossing(previous, current))
    return out


def fit_polygons(polygons: list[list[float]], width: float, height: float) -> tuple[list[list[float]], int]:
    """(``polygons`` with each one that reaches outside [-W, 2W] x [-H, 2H] clipped to it, how many were);
    checked polygons in (lists of at least 3 finite x, y pairs)."""
    x0, y0, x1, y1 = -width, -height, 2 * width, 2 * height
    fitted, clipped = [], 0
    for polygon in polygons:
        xs, ys = polygon[0::2], polygon[1::2]
        if x0 <= min(xs) and max(xs) <= x1 and y0 <= min(ys) and max(ys) <= y1:  # builtins: train2017 has 860k objects
            fitted.append(polygon)
            continue
        points = list(zip(xs, ys))
        clipped += 1
        for axis, limit, below in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):
            points = _clip(points, axis, limit, below)
        if len(points) < 3:  # it misses the rectangle (or only touches it): no pixel of the image either
            points = [(x0, y0)] * 3
        fitted.append([float(v) for point in points for v in point])
    return fitted, clipped
