"""LLaVA-UHD slicing against expectations worked out BY HAND from the rules in REFERENCE.md.

Rules: multiple = min(ceil(W*H / S^2), max); candidates i in (multiple-1, multiple, multiple+1), skipping 1 and
> max, every cols x rows == i (cols ascending); best = min |log(W/H) - log(cols/rows)|, first on ties.
best_resize((w, h), up): if w*h > S^2 or up: r = w/h; h = int(S/sqrt(r)); w = int(h*r); then each side ->
ensure_divide(x, P) = max(round(x/P)*P, P). Overview = best_resize(size, up=False); cell =
best_resize((ensure_divide(W, cols)/cols, ensure_divide(H, rows)/rows), up=True).
"""
import pytest
import torch
from PIL import Image

from dataset.media import (ensure_divide, find_best_grid, image_inputs, image_placeholder, image_to_tensor,
                           slice_image)
from model.model_omni import IMAGE_PAD, OmniConfig

CASES = [
    # (W, H), S, P, max -> grid (cols, rows), overview (w, h), slice (w, h)
    # 1344x1344: area/448^2 = 9 -> multiple 9; i in 8, 9 (10 > max); 3x3 has log error 0.
    # overview: r=1, h=int(448)=448, w=448. cell: ensure_divide(1344, 3)=1344 -> 448x448 -> stays 448x448.
    ((1344, 1344), 448, 14, 9, (3, 3), (448, 448), (448, 448)),
    # 100x80: ceil(8000/200704) = 1 -> no slicing; upscale: r=1.25, h=int(448/1.1180)=int(400.7)=400,
    # w=int(400*1.25)=500; round(500/14=35.71)=36 -> 504, round(400/14=28.57)=29 -> 406.
    ((100, 80), 448, 14, 9, None, (504, 406), None),
    # 1800x400: 720000/200704 = 3.59 -> 4; candidates 1x3 3x1 1x4 2x2 4x1 1x5 5x1; log(4.5)=1.504:
    # |1.504-log 4|=0.118, |1.504-log 5|=0.105 -> 5x1. overview: r=4.5, h=int(448/2.1213)=int(211.2)=211,
    # w=int(949.5)=949 -> round(67.8)=68 -> 952, round(15.07)=15 -> 210.
    # cell: (1800/5, 400/1) = (360, 400), r=0.9, h=int(448/0.9487)=int(472.2)=472, w=int(424.8)=424
    # -> round(30.3)=30 -> 420, round(33.7)=34 -> 476.
    ((1800, 400), 448, 14, 9, (5, 1), (952, 210), (420, 476)),
    # 400x1800: the mirror image: 1x5, overview 210x952. cell (400/1, 1800/5) = (400, 360): r=1.111,
    # h=int(448/1.0541)=int(425.01)=425, w=int(425*1.111)=int(472.2)=472 -> round(33.7)=34 -> 476,
    # round(30.4)=30 -> 420.
    ((400, 1800), 448, 14, 9, (1, 5), (210, 952), (476, 420)),
    # tie: 449x449 -> 201601/200704 = 1.004 -> multiple 2; candidates 1x2, 2x1 (i=1 skipped), 1x3, 3x1;
    # |0 - log(1/2)| == |0 - log 2| -> the first, 1x2 (cols=1, rows=2). overview: r=1 -> 448x448.
    # cell: ensure_divide(449, 1)=449 (round(449.0)), ensure_divide(449, 2)=round(224.5)*2 = 224*2 = 448
    # (half to even!) -> (449, 224); r=2.0045, h=int(448/1.4158)=int(316.4)=316, w=int(633.4)=633
    # -> round(45.2)=45 -> 630, round(22.57)=23 -> 322.
    ((449, 449), 448, 14, 9, (1, 2), (448, 448), (630, 322)),
    # 896x448: 401408/200704 = 2 -> candidates 1x2 2x1 1x3 3x1; 2x1 exact. overview: r=2,
    # h=int(448/1.4142)=int(316.8)=316, w=632 -> round(45.1)=45 -> 630, round(22.57)=23 -> 322. cell 448x448.
    ((896, 448), 448, 14, 9, (2, 1), (630, 322), (448, 448)),
    # tiny setting S=112, P=14, max 4. 224x224: 50176/12544 = 4 -> 4; i=5 > max; 2x2 exact.
    # overview r=1 -> 112x112; cell (112, 112) -> 112x112.
    ((224, 224), 112, 14, 4, (2, 2), (112, 112), (112, 112)),
    # tiny 300x100: 30000/12544 = 2.39 -> 3; 3x1 exact. overview: r=3, h=int(112/1.732)=int(64.7)=64, w=192
    # -> round(13.7)=14 -> 196, round(4.57)=5 -> 70. cell: (300/3, 100) = (100, 100) -> upscaled 112x112.
    ((300, 100), 112, 14, 4, (3, 1), (196, 70), (112, 112)),
    # tiny 60x40: no slicing; r=1.5, h=int(112/1.2247)=int(91.4)=91, w=int(136.5)=136
    # -> round(9.71)=10 -> 140, round(6.5)=6 (half to even) -> 84.
    ((60, 40), 112, 14, 4, None, (140, 84), None),
]


@pytest.mark.parametrize("size,S,P,max_slices,grid,overview,cell", CASES)
def test_slicing_table(size, S, P, max_slices, grid, overview, cell):
    assert find_best_grid(size, S, max_slices) == grid
    ov, slices, g = slice_image(Image.new("RGB", size, (200, 30, 30)), S, P, max_slices)
    assert g == grid and ov.size == overview
    if grid is None:
        assert slices == []
    else:
        cols, rows = grid
        assert len(slices) == rows and all(len(row) == cols for row in slices)
        assert all(s.size == cell for row in slices for s in row)


def test_ensure_divide_rounds_half_to_even():
    assert ensure_divide(224.5 * 2, 2) == 448 and ensure_divide(7, 14) == 14 and ensure_divide(21, 14) == 28


def test_slices_are_row_major_cells_of_the_resized_image():
    # a 2x2 colour checker at 224x224 (tiny setting -> 2x2 grid): the cells come back in row-major order
    img = Image.new("RGB", (224, 224))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for k, c in enumerate(colours):
        img.paste(c, ((k % 2) * 112, (k // 2) * 112, (k % 2 + 1) * 112, (k // 2 + 1) * 112))
    _, slices, grid = slice_image(img, 112, 14, 4)
    assert grid == (2, 2)
    centres = [s.getpixel((56, 56)) for row in slices for s in row]
    assert centres == colours


def test_placeholder_1344():
    text = image_placeholder((3, 3), 64)
    assert text.count(IMAGE_PAD) == 10 * 64
    lines = text.split("\n")
    assert len(lines) == 4 and lines[0] == "<image>" + IMAGE_PAD * 64 + "</image>"
    assert all(line == ("<slice>" + IMAGE_PAD * 64 + "</slice>") * 3 for line in lines[1:])
    assert image_placeholder(None, 64) == lines[0]


def test_image_to_tensor_and_inputs():
    x = image_to_tensor(Image.new("RGB", (28, 14), (255, 0, 127)))
    assert x.shape == (3, 14, 28)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 127 / 255 * 2 - 1]))
    cfg = OmniConfig.preset("tiny")  # S=112, P=14, query 16, max 4 slices
    tensors, grid_hw, text = image_inputs(Image.new("RGB", (300, 100)), cfg)
    assert [tuple(t.shape) for t in tensors] == [(3, 70, 196)] + [(3, 112, 112)] * 3
    assert grid_hw.tolist() == [[5, 14]] + [[8, 8]] * 3
    assert text.count(IMAGE_PAD) == 4 * cfg.query_num
