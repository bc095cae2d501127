"""``timm-l2w predict`` finishes the job: a file that cannot be read is reported (the CSV's ``error`` column,
stderr, exit status 1) and every other file predicted; 16-bit grayscale is scaled to 8 bits, not clipped;
images with no known value range are refused with a message."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import gray_images, tiny_package
from timm_l2w_runtime import EarlyExitRuntime, to_eight_bits
from timm_l2w_runtime.images import load_image
from timm_l2w_runtime.predict import main as predict_main


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return tiny_package(tmp_path_factory.mktemp("tiny"))[1]


def _save(folder: Path, images, dtype=np.uint8, scale: int = 1) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, a in enumerate(images):
        files.append(folder / f"{i:02d}.png")
        Image.fromarray(a.astype(dtype) * scale).save(files[-1])
    return files


def test_a_corrupt_file_among_good_ones_is_reported_and_the_rest_predicted(package, tmp_path, capsys):
    good = _save(tmp_path / "images", gray_images(9))
    (tmp_path / "images" / "03.png").write_bytes(b"not a png at all")  # unreadable
    truncated = tmp_path / "images" / "06.png"
    truncated.write_bytes(truncated.read_bytes()[:60])  # a PNG cut short: opens, fails to decode
    missing = tmp_path / "gone.png"
    out = tmp_path / "predictions.csv"
    code = predict_main([str(package), str(tmp_path / "images"), str(missing), "--output", str(out),
                         "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 1
    assert "3 of 10 files could not be read" in captured.err and "Traceback" not in captured.err
    assert "7 images, rule confidence" in captured.out  # 9 files, 2 of them damaged
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["file"]).name for r in rows] == [f.name for f in good] + ["gone.png"]
    failed = {Path(r["file"]).name: r["error"] for r in rows if r["error"]}
    assert set(failed) == {"03.png", "06.png", "gone.png"}
    assert "03.png is not a readable image" in failed["03.png"] and "06.png is not a readable image" in failed["06.png"]
    assert "does not exist" in failed["gone.png"]
    assert all(r["prediction"] == r["exit"] == "" for r in rows if r["error"])

    readable = [f for f in good if f.name not in failed]
    runtime = EarlyExitRuntime(package)
    files, want = runtime.predict_files(readable)  # the strict call on the good files alone
    got = [r for r in rows if not r["error"]]
    assert [int(r["prediction"]) for r in got] == want.predictions.tolist()
    assert [int(r["exit"]) - 1 for r in got] == want.exit_index.tolist()
    with pytest.raises(ValueError, match="03.png is not a readable image"):
        runtime.predict_files(good)  # predict_files still stops at the first bad file


def test_all_files_unreadable_still_writes_the_csv_and_fails(package, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    out = tmp_path / "p.csv"
    assert predict_main([str(package), str(bad), "--output", str(out)]) == 1
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["error"] and rows[0]["prediction"] == ""
    assert "1 of 1 files could not be read" in capsys.readouterr().err


def test_a_16_bit_png_predicts_as_its_8_bit_version(package, tmp_path):
    images = gray_images(24, seed=3)
    eight = _save(tmp_path / "8", images)
    sixteen = _save(tmp_path / "16", images, np.uint16, 257)  # v * 257: the 16-bit version of v
    with Image.open(sixteen[0]) as img:
        assert img.mode.startswith("I;16")
    runtime = EarlyExitRuntime(package)
    np.testing.assert_array_equal(runtime.preprocess(sixteen), runtime.preprocess(eight))
    _, want = runtime.predict_files(eight)
    _, got = runtime.predict_files(sixteen)
    np.testing.assert_array_equal(got.predictions, want.predictions)
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    # any 16-bit value: rounded to the nearest 8-bit level, never clipped to 0 / 255 as convert('L') does
    wide = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 256 + 100).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    got8 = np.asarray(load_image(tmp_path / "wide.png", "L"))
    np.testing.assert_array_equal(got8, np.rint(wide / 257.0).astype(np.uint8))
    assert len(np.unique(got8)) > 200


def test_image_modes_convert_or_are_refused_with_a_message(tmp_path):
    a = gray_images(1, size=8)[0]
    png_i = Image.fromarray(a.astype(np.int32) * 257)  # how older PIL opens a 16-bit PNG: mode 'I'
    png_i.format = "PNG"
    np.testing.assert_array_equal(np.asarray(to_eight_bits(png_i)), a)
    big_endian = Image.fromarray((a.astype(np.uint16) * 257).astype(">u2"))
    assert big_endian.mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(to_eight_bits(big_endian)), a)
    int32 = Image.fromarray(a.astype(np.int32) * 257)  # mode I, in memory: no format, so no known range
    for img, kind in ((int32, "32-bit integer"), (Image.fromarray(a.astype(np.float32)), "floating point")):
        with pytest.raises(ValueError, match=f"a {kind} image .* no known value range"):
            to_eight_bits(img)
    Image.fromarray(a.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif is not a readable image .*floating point"):
        load_image(tmp_path / "float.tif", "L")
    for mode in ("P", "RGBA", "LA", "1", "CMYK"):  # 8-bit modes: PIL's conversion, as timm's loaders do
        img = Image.fromarray(np.stack([a] * 3, -1)).convert(mode)
        img.save(tmp_path / f"{mode}.{'tif' if mode == 'CMYK' else 'png'}")
        for color in ("L", "RGB"):
            got = load_image(tmp_path / f"{mode}.{'tif' if mode == 'CMYK' else 'png'}", color)
            assert got.mode == color and got.size == (8, 8)
