"""Parse `phrase [[x0,y0,x1,y1;...]]` boxes (0-999 per mille, origin top-left) from generated text."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

_GROUP = re.compile(r"\[\[(.*?)\]\]", re.S)
_SPLIT_PHRASE = re.compile(r"[.;:!?\n]|\]\]")


@dataclass
class Box:
    phrase: str
    box: tuple[float, float, float, float]  # normalized to [0, 1]: x0, y0, x1, y1
    box_pixels: tuple[int, int, int, int] | None = None  # when the image size is known


@dataclass
class Grounding:
    boxes: list[Box] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed parts, one message each

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": [asdict(b) for b in self.boxes], "errors": list(self.errors)}


def _phrase_before(text: str, start: int, prev_end: int) -> str:
    segment = text[prev_end:start]
    parts = _SPLIT_PHRASE.split(segment)
    phrase = parts[-1] if parts else segment
    return phrase.strip(" ,\t")


def parse_boxes(text: str, image_size: tuple[int, int] | None = None) -> Grounding:
    """Structured boxes from text; never raises. `image_size` is (width, height) for pixel boxes."""
    out = Grounding()
    prev_end = 0
    for m in _GROUP.finditer(text):
        phrase = _phrase_before(text, m.start(), prev_end)
        prev_end = m.end()
        for raw in m.group(1).split(";"):
            raw = raw.strip()
            coords = [c.strip() for c in raw.split(",")]
            if len(coords) != 4 or not all(c.isdigit() for c in coords):
                out.errors.append(f"malformed box {raw!r} (want four integers 000-999)")
                continue
            x0, y0, x1, y1 = (int(c) for c in coords)
            if max(x0, y0, x1, y1) > 999:
                out.errors.append(f"box {raw!r} has a coordinate above 999")
                continue
            if x1 < x0 or y1 < y0:
                out.errors.append(f"box {raw!r} has x1 < x0 or y1 < y0")
                continue
            norm = (x0 / 1000, y0 / 1000, x1 / 1000, y1 / 1000)
            pixels = None
            if image_size is not None:
                w, h = image_size
                pixels = (round(norm[0] * w), round(norm[1] * h), round(norm[2] * w), round(norm[3] * h))
            out.boxes.append(Box(phrase, norm, pixels))
    tail = text[prev_end:]
    if "[[" in tail:
        out.errors.append(f"unclosed box group {tail[tail.index('[['):][:40]!r}")
    return out
