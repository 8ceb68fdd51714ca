"""The image path of the policy: load, pad to a square, process. Every stage shares it.

The llava-1.5 processor resizes the short side to 336 px and centre-crops, so a wide chart would lose its
left and right edges (axis labels, legends). LLaVA-1.5 was trained on images padded to a square in the image
processor's mean colour (``expand2square`` in the LLaVA code); `process_images` does the same before the
processor, so the whole chart is seen in training, generation and the test loss alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's normalisation mean as an RGB colour, truncated as LLaVA's ``expand2square`` call does.

    Padding in it is (nearly) zero after normalisation.
    """
    return tuple(int(255 * m) for m in image_processor.image_mean)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square of its longer side filled with `fill` (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def process_images(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Pixel values the policy sees: RGB, padded to a square, then the processor's resize and crop.

    Returns:
        (B, 3, H, W) float tensor.
    """
    fill = mean_colour(processor.image_processor)
    squares = [pad_to_square(im.convert("RGB"), fill) for im in images]
    return processor.image_processor(images=squares, return_tensors="pt")["pixel_values"]


def load_pixels(
    processor, data_dir: Path, images: Iterable[str], batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Process every distinct image once: relative image path -> pixel_values (3, H, W)."""
    paths = sorted(set(images))
    pixels = {}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        loaded = []
        for rel in chunk:
            with Image.open(Path(data_dir) / rel) as im:
                loaded.append(im.convert("RGB"))
        pixels.update(zip(chunk, process_images(processor, loaded)))
    return pixels
