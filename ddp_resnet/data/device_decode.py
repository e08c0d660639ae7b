"""ImageFolder with JPEG decoding on the training device (``data.decode=device``).

DataLoader workers only read each file and work out its geometry (they parse the JPEG header for the image size,
then draw the same random-resized-crop / crop / flip parameters from ``(seed, epoch, index)`` as the PIL path).
The main process decodes the whole batch in one call (nvJPEG on CUDA) with TorchCodec's ``decode_jpeg`` when
``torchcodec`` is installed, else torchvision's (deprecated since torchvision 0.29 in favour of TorchCodec), then
crops, resizes (bilinear, antialiased) and flips each image on the device. Files that are not JPEG are decoded by
PIL in the worker and only transformed on the device.

Given the same pixels, the device transforms equal the PIL path's geometry exactly (same crop boxes, output sizes,
center-crop offsets and flips); pixels differ only by the decoders' and resamplers' rounding (a level or two).
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from ddp_resnet.data import imagefolder
from ddp_resnet.data.transforms import crop_flip, crop_flip_params_one, resize_nchw_uint8, rrc_params, sample_rng

JPEG_MAGIC = b"\xff\xd8\xff"
# One row of geometry per sample: crop box in the decoded image (top, left, height, width), size it is resized to
# (height, width), then the corner of the ``size x size`` center crop of the resized image (may be negative: the
# crop is zero-padded as torchvision's center_crop pads), then crop-flip offsets (dy, dx) and the flip flag.
GEOMETRY_FIELDS = ("top", "left", "height", "width", "out_h", "out_w", "crop_top", "crop_left", "dy", "dx", "flip")


EXIF_ORIENTATION = 0x0112


def read_encoded(path: str) -> tuple[torch.Tensor, bool, int, int]:
    """``(payload, is_jpeg, width, height)``: the file's bytes for a JPEG (size from its header), otherwise the
    image decoded to ``3 x H x W`` uint8 by PIL.

    A JPEG with an EXIF orientation tag is decoded here by PIL too: like torchvision's ImageFolder, the PIL path
    ignores the tag, while TorchCodec's decoder applies it (and would swap height and width).
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:3] == JPEG_MAGIC:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            oriented = img.getexif().get(EXIF_ORIENTATION, 1) != 1
        if not oriented:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, width, height
    img = imagefolder.load_rgb(path)
    return TF.pil_to_tensor(img), False, img.width, img.height


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """The size ``torchvision.transforms.functional.resize(img, shorter)`` gives: shorter side ``shorter``, the
    longer side scaled and truncated."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def _center_start(length: int, size: int) -> int:
    # torchvision's center_crop: a side shorter than the crop is first zero-padded by (size - length) // 2 before
    # it; a longer side is cropped from round((length - size) / 2).
    return -((size - length) // 2) if length < size else int(round((length - size) / 2.0))


def center_corner(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner of torchvision's ``center_crop(size)`` in a ``height x width`` image (negative: padded)."""
    return _center_start(height, size), _center_start(width, size)


def train_geometry(width: int, height: int, size: int, augment: str, padding: int, seed: int, epoch: int,
                   index: int) -> list[int]:
    """The PIL path's training geometry for one sample (see ``GEOMETRY_FIELDS``)."""
    if augment == "rrc_flip":
        rng = sample_rng(seed, epoch, index)
        top, left, h, w = rrc_params(width, height, rng)
        flip = rng.random() < 0.5
        return [top, left, h, w, size, size, 0, 0, 0, 0, int(flip)]
    out_h, out_w = resized_size(height, width, size)
    dy = dx = flip = 0
    if augment != "none":
        dy, dx, flip = crop_flip_params_one(seed, epoch, index, 2 * padding)
    return [0, 0, height, width, out_h, out_w, *center_corner(out_h, out_w, size), dy, dx, int(flip)]


def eval_geometry(width: int, height: int, size: int, resize: int) -> list[int]:
    """Evaluation geometry: resize the shorter side to ``resize``, center-crop ``size``."""
    out_h, out_w = resized_size(height, width, resize)
    return [0, 0, height, width, out_h, out_w, *center_corner(out_h, out_w, size), 0, 0, 0]


class EncodedFolderTrain(Dataset):
    """Training items ``(index, epoch)`` -> ``(payload, is_jpeg, geometry, label)``."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, augment: str, padding: int, seed: int):
        self.samples, self.size, self.augment, self.seed = samples, size, augment, seed
        self.padding = padding if augment == "crop_flip" else 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        path, label = self.samples[index]
        payload, is_jpeg, width, height = read_encoded(path)
        geometry = train_geometry(width, height, self.size, self.augment, self.padding, self.seed, epoch, index)
        return payload, is_jpeg, geometry, label


class EncodedFolderEval(Dataset):
    """Evaluation items ``index`` -> ``(payload, is_jpeg, geometry, label)``."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, resize: int):
        self.samples, self.size, self.resize = samples, size, resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        payload, is_jpeg, width, height = read_encoded(path)
        return payload, is_jpeg, eval_geometry(width, height, self.size, self.resize), label


def collate_encoded(items: list) -> tuple[list[torch.Tensor], list[bool], torch.Tensor, torch.Tensor]:
    """Batch of encoded items: payloads stay a list (they differ in length), geometry and labels are stacked."""
    payloads, is_jpeg, geometry, labels = zip(*items)
    return list(payloads), list(is_jpeg), torch.tensor(geometry, dtype=torch.int64), torch.tensor(labels)


def _torchcodec_decode(data, device: torch.device | str = "cpu"):
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(data, mode="RGB", device=device)


def _torchvision_decode(data, device: torch.device | str = "cpu"):
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.29 points users to TorchCodec, which we use when installed
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


JPEG_BACKENDS: dict[str, Callable] = {"torchcodec": _torchcodec_decode, "torchvision": _torchvision_decode}


def default_backend() -> str:
    """``torchcodec`` when it is installed, else ``torchvision``."""
    return "torchcodec" if importlib.util.find_spec("torchcodec") is not None else "torchvision"


def decode_all(payloads: list[torch.Tensor], is_jpeg: list[bool], device: torch.device,
               backend: str = "torchvision") -> list[torch.Tensor]:
    """``3 x H x W`` uint8 images on ``device``: the JPEGs decoded there in one batched call."""
    decode_jpeg = JPEG_BACKENDS[backend]
    out: list[torch.Tensor | None] = [None] * len(payloads)
    jpegs = [i for i, flag in enumerate(is_jpeg) if flag]
    if jpegs:
        encoded = [payloads[i] for i in jpegs]
        try:
            decoded = decode_jpeg(encoded, device=device)
        except RuntimeError:  # e.g. a CMYK or progressive file the device decoder refuses: decode those on the CPU
            decoded = [decode_jpeg(data).to(device) for data in encoded]
        for i, image in zip(jpegs, decoded):
            out[i] = image
    for i, flag in enumerate(is_jpeg):
        if not flag:
            out[i] = payloads[i].to(device)
    return out  # type: ignore[return-value]


def _crop(image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """``size x size`` window at (top, left); parts outside the image are zero (torchvision's center_crop pad)."""
    _, height, width = image.shape
    if 0 <= top and 0 <= left and top + size <= height and left + size <= width:
        return image[:, top : top + size, left : left + size]
    out = image.new_zeros((image.shape[0], size, size))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, height), min(left + size, width)
    if y1 > y0 and x1 > x0:
        out[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
    return out


def transform_batch(images: list[torch.Tensor], geometry: torch.Tensor, size: int, padding: int) -> torch.Tensor:
    """Apply each sample's geometry: ``B x 3 x size x size`` uint8 on the images' device."""
    rows = geometry.tolist()
    shaped = []
    for image, (top, left, h, w, out_h, out_w, crop_top, crop_left, _, _, _) in zip(images, rows):
        image = resize_nchw_uint8(image[None, :, top : top + h, left : left + w], out_h, out_w)[0]
        shaped.append(_crop(image, crop_top, crop_left, size))
    batch = torch.stack(shaped).permute(0, 2, 3, 1)  # B x S x S x C for the batched crop-flip gather
    dy, dx, flip = geometry[:, 8:].to(batch.device, non_blocking=True).unbind(1)  # one small copy per batch
    return crop_flip(batch, None, dy, dx, flip.bool(), size, padding)


class DeviceDecoder:
    """Turns a collated encoded batch into uint8 images and labels on ``device`` (called in the main process)."""

    def __init__(self, device: torch.device, size: int, padding: int, backend: str | None = None) -> None:
        self.device, self.size, self.padding = device, size, padding
        self.backend = backend or default_backend()
        if self.backend not in JPEG_BACKENDS:
            raise ValueError(f"unknown JPEG backend {self.backend!r}; valid choices: {', '.join(JPEG_BACKENDS)}")

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        payloads, is_jpeg, geometry, labels = batch
        decoded = decode_all(payloads, is_jpeg, self.device, self.backend)
        images = transform_batch(decoded, geometry, self.size, self.padding)
        return images, labels.to(self.device, non_blocking=True)
