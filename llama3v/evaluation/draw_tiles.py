"""Draw how an image is tiled (LLaVA-NeXT anyres and slices) for the docs.

    .venv/bin/python -m llama3v.evaluation.draw_tiles IMAGE -o docs/tiles.png [--size 336] [--max-tiles 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from llama3v.runtime.image_processing import ImageSpec, load_image, process_image

LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_GAP, _LABEL = 16, 22


def _grid_panel(tiles: list[Image.Image], rows: int, cols: int, title: str) -> Image.Image:
    size = tiles[0].width
    panel = Image.new("RGB", (cols * size, rows * size + _LABEL), "white")
    draw = ImageDraw.Draw(panel)
    draw.text((4, 4), title, fill="black")
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        panel.paste(tile, (c * size, _LABEL + r * size))
        draw.rectangle((c * size, _LABEL + r * size, (c + 1) * size - 1, _LABEL + (r + 1) * size - 1),
                       outline=(255, 40, 40), width=3)
        draw.text((c * size + 6, _LABEL + r * size + 6), f"tile {i + 1}", fill=(255, 255, 0))
    return panel


def draw(image: Image.Image, size: int, max_tiles: int) -> Image.Image:
    """A figure: anyres tiles + base view, and slices + global view, each as the tower sees them."""
    anyres = process_image(image, ImageSpec(size, "squash", grid_pinpoints=LLAVA_NEXT_PINPOINTS))
    sliced = process_image(image, ImageSpec(size, "resize", max_tiles=max_tiles))
    panels = []
    for processed, name, base in ((anyres, "anyres (LLaVA-NeXT)", "base view"), (sliced, "slices", "global view")):
        tiles = [Image.fromarray(t) for t in processed.tiles]
        rows, cols = processed.layout.grid
        panels.append(_grid_panel(tiles[:1], 1, 1, f"{name}: {base}"))
        panels.append(_grid_panel(tiles[1:], rows, cols, f"{name}: {rows} x {cols} tiles"))
    width = sum(p.width for p in panels) + _GAP * (len(panels) - 1)
    figure = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        figure.paste(p, (x, 0))
        x += p.width + _GAP
    scale = min(1.0, 1600 / figure.width)
    return figure.resize((int(figure.width * scale), int(figure.height * scale)), Image.Resampling.LANCZOS)


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--size", type=int, default=336, help="tower input size (336)")
    ap.add_argument("--max-tiles", type=int, default=4, help="slices mode: most slices (4)")
    args = ap.parse_args()
    draw(load_image(args.image), args.size, args.max_tiles).save(args.output, optimize=True)
    print(args.output)


if __name__ == "__main__":
    main()
