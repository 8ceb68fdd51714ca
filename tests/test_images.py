"""The whole chart is seen: padding to a square before the llava-1.5 processor, and the critic's own path."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from posttrain.models.images import load_pixels, mean_colour, pad_to_square, process_images

SRC = Path(__file__).resolve().parents[1] / "src" / "posttrain"
RED, BLUE = (255, 0, 0), (0, 0, 255)


def wide_chart(width: int = 600, height: int = 200) -> Image.Image:
    """White, with a red band at the left edge and a blue band at the right edge (axis labels, legends)."""
    img = Image.new("RGB", (width, height), "white")
    img.paste(RED, (0, 0, width // 20, height))
    img.paste(BLUE, (width - width // 20, 0, width, height))
    return img


def llava15_processor():
    """The llava-1.5 image processor (CLIP, short side 336, centre crop 336), as the stand-in writes it."""
    return CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_convert_rgb=True
    )


def rgb(image_processor, pixel_values) -> np.ndarray:
    """(3, H, W) normalised pixel values back to 0-255 RGB, (H, W, 3)."""
    mean = np.array(image_processor.image_mean)[:, None, None]
    std = np.array(image_processor.image_std)[:, None, None]
    return ((pixel_values.numpy() * std + mean) * 255).round().transpose(1, 2, 0)


def has_colour(pixels: np.ndarray, colour: tuple[int, int, int], tol: float = 30) -> bool:
    return bool((np.abs(pixels - np.array(colour)).max(axis=-1) < tol).any())


def test_pad_to_square_centres_the_image_on_the_fill():
    padded = pad_to_square(wide_chart(), (1, 2, 3))
    assert padded.size == (600, 600)
    assert padded.getpixel((300, 0)) == (1, 2, 3) and padded.getpixel((300, 599)) == (1, 2, 3)
    assert padded.getpixel((0, 300)) == RED and padded.getpixel((599, 300)) == BLUE
    square = Image.new("RGB", (84, 84), "white")
    assert pad_to_square(square, (0, 0, 0)) is square  # the synthetic charts are untouched


def test_wide_chart_keeps_its_edges_only_when_padded():
    """The processor alone centre-crops a wide chart's edges away; padded first, both edges survive."""
    ip = llava15_processor()
    cropped = rgb(ip, ip(images=[wide_chart()], return_tensors="pt")["pixel_values"][0])
    assert not has_colour(cropped, RED) and not has_colour(cropped, BLUE)  # the bug this fixes

    class Processor:  # what process_images reads of a LlavaProcessor
        image_processor = ip

    seen = rgb(ip, process_images(Processor, [wide_chart()])[0])
    assert seen.shape == (336, 336, 3)
    assert has_colour(seen[:, :20], RED) and has_colour(seen[:, -20:], BLUE)
    # the padding is the processor's mean colour, which normalises to zero
    assert mean_colour(ip) == (122, 116, 104)
    normalised = process_images(Processor, [wide_chart()])[0]
    assert normalised[:, :50, 168].abs().max() < 0.02


def test_every_policy_stage_reads_images_through_one_function():
    """Only posttrain.models.images calls the policy's image processor; training, generation and loss use
    it."""
    callers = sorted(
        p.relative_to(SRC).as_posix()
        for p in SRC.rglob("*.py")
        if re.search(r"\.image_processor\(", p.read_text(encoding="utf-8"))
    )
    assert callers == ["models/images.py"]
    for module in ("train/dataset.py", "evaluate/evaluation.py", "train/preferences.py", "train/dpo.py"):
        assert "load_pixels" in (SRC / module).read_text(encoding="utf-8")


def test_load_pixels_pads_the_images_of_a_prepared_folder(tmp_path):
    (tmp_path / "images").mkdir()
    wide_chart().save(tmp_path / "images" / "wide.png")

    class Processor:
        image_processor = llava15_processor()

    pixels = load_pixels(Processor, tmp_path, ["images/wide.png", "images/wide.png"])
    assert list(pixels) == ["images/wide.png"]  # each image once
    seen = rgb(Processor.image_processor, pixels["images/wide.png"])
    assert has_colour(seen[:, :20], RED) and has_colour(seen[:, -20:], BLUE)


@pytest.mark.filterwarnings("ignore")
def test_the_critic_processor_sees_the_whole_chart(tmp_path):
    """LLaVA-OneVision's anyres processor: its first tile is the whole image resized, edges included."""
    from posttrain.evaluate.critic import qwen_render
    from posttrain.models.architectures import load_config, shrink
    from posttrain.models.critic_checkpoint import load_onevision_processor
    from posttrain.realscale.convert_critic import write_processor
    from posttrain.realscale.standin import QWEN2_SPECIALS, standin_tokenizer

    tok = standin_tokenizer(["a chart"] * 3, QWEN2_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    write_processor(tmp_path, tok, shrink(load_config("llava-critic-7b")))
    processor = load_onevision_processor(tmp_path)
    out = processor(images=[wide_chart()], text=[qwen_render("Q")], return_tensors="pt")
    whole = rgb(processor.image_processor, out["pixel_values"][0, 0])
    assert has_colour(whole[:, :20], RED) and has_colour(whole[:, -20:], BLUE)
