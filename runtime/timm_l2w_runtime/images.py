"""Image files to model input with numpy and PIL, exactly as timm_l2w prepares eval images.

Two resize modes (the policy's ``preprocess`` entry, :func:`timm_l2w_runtime.policy.check_preprocess`):

* ``"stretch"``: the built-in data sets of ``timm_l2w.data`` (digits, Fashion-MNIST): pixels to
  ``[0, 1]``, a bilinear resize to ``H x W`` in floating point without antialiasing (what
  ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)`` computes), grayscale
  repeated to the model's channels, then ``(x - mean) / std``.
* ``"shorter_side"``: timm's eval transform (CIFAR, ImageFolder trees, timm's ``pretrained_cfg``):
  a PIL resize of the shorter side to ``resize_size`` (the longer side keeps the aspect ratio,
  rounded down as torchvision does), a centre crop to ``H x W``, pixels to ``[0, 1]``, then
  ``(x - mean) / std``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "load_image", "to_eight_bits", "preprocess_image", "preprocess_files", "preprocess_each",
           "resize_bilinear", "find_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PathLike = Union[str, "os.PathLike[str]"]


def _linear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows ``i0``, ``i1`` and the weight of ``i1`` for every output row (half-pixel centres)."""
    scale = np.float32(in_size / out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    weight = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, in_size - 1), weight


def resize_bilinear(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of ``[..., h, w]`` float32 to ``[..., H, W]`` (``align_corners=False``, no antialiasing)."""
    out_h, out_w = int(size[0]), int(size[1])
    if x.shape[-2:] == (out_h, out_w):
        return x
    r0, r1, wr = _linear_taps(x.shape[-2], out_h)
    c0, c1, wc = _linear_taps(x.shape[-1], out_w)
    rows = x[..., r0, :] * (1 - wr)[:, None] + x[..., r1, :] * wr[:, None]
    return rows[..., c0] * (1 - wc) + rows[..., c1] * wc


def to_eight_bits(img: Any) -> Any:
    """``img`` with 8-bit channels: 16-bit grayscale (``'I;16'`` and its byte orders, and ``'I'`` as PIL opens a
    16-bit PNG) scaled to 8 bits (``round(v / 257)``: ``v * 257`` gives ``v`` back), not clipped as PIL's
    ``convert`` would; other modes as they are (PIL converts them). A ``'F'`` (floating point) or a non-PNG
    ``'I'`` (32-bit integer) image has no known value range: a ValueError says so."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or (mode == "I" and getattr(img, "format", None) == "PNG"):
        a = np.asarray(img).astype(np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"a 16-bit image holds values outside 0..65535 ({a.min():g}..{a.max():g})")
        return Image.fromarray(np.rint(a / 257.0).astype(np.uint8), mode="L")
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating point"
        raise ValueError(f"a {kind} image (mode {mode!r}) has no known value range: save it as an 8-bit or "
                         "16-bit PNG (or an 8-bit JPEG)")
    return img


def load_image(path: PathLike, color: str) -> Any:
    """Open an image file as a PIL image in ``color`` mode (``'RGB'`` or ``'L'``).

    16-bit grayscale is scaled to 8 bits first (:func:`to_eight_bits`); 16-bit colour PNGs are read as 8 bits
    by PIL. A file that is not an image, or is damaged, or has no known value range raises a ValueError naming it.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return to_eight_bits(img).convert(color)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist: check the path") from None
    except Exception as err:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, zlib.error, ...
        reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        raise ValueError(f"{path} is not a readable image ({reason}): pass PNG/JPEG/... files") from None


def _pil_resample(name: str) -> int:
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[name]


def _resize_shorter_side(img: Any, size: int, interpolation: str) -> Any:
    """torchvision's ``Resize(size)`` on a PIL image: shorter side to ``size``, aspect ratio kept (floored)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _pil_resample(interpolation))


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's ``CenterCrop`` on ``[C, h, w]``: zero padding when the image is smaller, then the centre."""
    h, w = x.shape[-2:]
    if h < height or w < width:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        x = np.pad(x, ((0, 0), (pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)))
        h, w = x.shape[-2:]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return x[:, top:top + height, left:left + width]


def _to_chw(img: Any) -> np.ndarray:
    """PIL image to ``[C, h, w]`` float32 in ``[0, 1]``."""
    a = np.asarray(img, dtype=np.uint8)
    a = a[:, :, None] if a.ndim == 2 else a
    return np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)


def preprocess_image(img: Any, pre: Mapping[str, Any]) -> np.ndarray:
    """A PIL image (or ``[C, h, w]`` float array in ``[0, 1]``, stretch mode) to normalised ``[C, H, W]`` float32."""
    channels, height, width = pre["input_size"]
    if pre["resize"] == "shorter_side":
        x = _center_crop(_to_chw(_resize_shorter_side(img, pre["resize_size"], pre["interpolation"])), height, width)
    else:
        x = resize_bilinear(img if isinstance(img, np.ndarray) else _to_chw(img), (height, width))
    if x.shape[0] == 1 and channels != 1:
        x = np.repeat(x, channels, axis=0)
    mean = np.asarray(pre["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(pre["std"], dtype=np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float32, copy=False)


def preprocess_files(paths: Sequence[PathLike], pre: Mapping[str, Any]) -> np.ndarray:
    """Image files to one ``[N, C, H, W]`` float32 batch (the first unreadable file raises)."""
    if not paths:
        raise ValueError("no images given: pass image files or folders holding them")
    return np.stack([preprocess_image(load_image(p, pre["color"]), pre) for p in paths])


def preprocess_each(paths: Sequence[PathLike], pre: Mapping[str, Any]) -> Tuple[List[int], np.ndarray, Dict[int, str]]:
    """Image files to ``(readable, batch, errors)``: the positions of the files read, their ``[n, C, H, W]``
    float32 batch (``n`` may be 0), and why each other file could not be read, by position."""
    readable: List[int] = []
    images: List[np.ndarray] = []
    errors: Dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            images.append(preprocess_image(load_image(path, pre["color"]), pre))
        except (ValueError, OSError) as err:
            errors[i] = str(err)
            continue
        readable.append(i)
    channels, height, width = pre["input_size"]
    batch = np.stack(images) if images else np.zeros((0, channels, height, width), dtype=np.float32)
    return readable, batch, errors


def find_images(items: Iterable[PathLike]) -> List[Path]:
    """Files as given, and the image files under any folder (sorted), in order."""
    found: List[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise ValueError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"image {path} does not exist: check the path")
    return found
