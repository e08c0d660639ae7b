"""ImageFolder with JPEG decoding on the training device (``data.decode=device``).

DataLoader workers only read each file and work out its geometry (they parse the JPEG header for the image size,
then draw the same random-resized-crop / crop / flip parameters from ``(seed, epoch, index)`` as the PIL path).
The main process decodes the whole batch in one call (nvJPEG on CUDA) with TorchCodec's ``decode_jpeg`` when
``torchcodec`` is installed, else torchvision's (deprecated since torchvision 0.29 in favour of TorchCodec), then
crops, resizes (bilinear, antialiased) and flips each image on the device. Files that are not JPEG are decoded by
PIL in the worker and only transformed on the device.

The random draws are the PIL path's, and the transforms are the same torchvision functions applied to tensors
(``resized_crop``, ``resize`` + ``center_crop``), so crop boxes, sizes and flips are identical; pixels differ only
by the decoders' and resamplers' rounding (a level or two).
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

from ddp_resnet.data.transforms import crop_flip, crop_flip_params_one, rrc_params, sample_rng, unpack_item

JPEG_MAGIC = b"\xff\xd8\xff"
# One row per sample: the random-resized-crop box (top, left, height, width; the whole image otherwise), then the
# crop-flip offsets (dy, dx) and the flip flag, all drawn in the worker exactly as the PIL path draws them.
GEOMETRY_FIELDS = ("top", "left", "height", "width", "dy", "dx", "flip")
EXIF_ORIENTATION = 0x0112


def read_encoded(path: str) -> tuple[torch.Tensor, bool, int, int]:
    """``(payload, is_jpeg, width, height)``: the file's bytes for a JPEG (size from its header), otherwise the
    image decoded to ``3 x H x W`` uint8 by PIL.

    A JPEG with an EXIF orientation tag is decoded here by PIL too: like torchvision's ImageFolder, the PIL path
    ignores the tag, while TorchCodec's decoder applies it (and would swap height and width).
    """
    with open(path, "rb") as fh:
        data = fh.read()
    with Image.open(io.BytesIO(data)) as img:  # reads the header only, until convert()
        width, height = img.size
        if data[:3] == JPEG_MAGIC and img.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, width, height
        return TF.pil_to_tensor(img.convert("RGB")), False, width, height


def train_geometry(width: int, height: int, augment: str, padding: int, seed: int, epoch: int,
                   index: int) -> list[int]:
    """The PIL path's random draws for one training sample (see ``GEOMETRY_FIELDS``)."""
    if augment == "rrc_flip":
        rng = sample_rng(seed, epoch, index)
        top, left, h, w = rrc_params(width, height, rng)
        return [top, left, h, w, 0, 0, int(rng.random() < 0.5)]
    dy = dx = flip = 0
    if augment != "none":
        dy, dx, flip = crop_flip_params_one(seed, epoch, index, 2 * padding)
    return [0, 0, height, width, dy, dx, int(flip)]


class EncodedFolderTrain(Dataset):
    """Training items ``(index, epoch[, repeat])`` -> ``(payload, is_jpeg, geometry, label)``.

    ``resize`` is what the decoder does before the crop-flip: ``None`` for a random-resized crop to ``size``,
    else resize the shorter side to ``size`` and center-crop (as ``_FolderTrainDataset``).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, augment: str, padding: int, seed: int):
        self.samples, self.size, self.augment, self.seed = samples, size, augment, seed
        self.padding = padding if augment == "crop_flip" else 0
        self.resize = None if augment == "rrc_flip" else size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, ...]):
        index, _, key = unpack_item(item)
        path, label = self.samples[index]
        payload, is_jpeg, width, height = read_encoded(path)
        geometry = train_geometry(width, height, self.augment, self.padding, self.seed, key, index)
        return payload, is_jpeg, geometry, label


class EncodedFolderEval(Dataset):
    """Evaluation items ``index`` -> ``(payload, is_jpeg, geometry, label)``: resize the shorter side to
    ``resize``, center-crop ``size``."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, resize: int):
        self.samples, self.size, self.resize, self.padding = samples, size, resize, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        payload, is_jpeg, width, height = read_encoded(path)
        return payload, is_jpeg, [0, 0, height, width, 0, 0, 0], label


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


def transform_batch(images: list[torch.Tensor], geometry: torch.Tensor, size: int, padding: int,
                    resize: int | None) -> torch.Tensor:
    """Each image through torchvision's tensor transforms (the PIL path's, on the images' device), then the
    batched crop-flip: ``B x 3 x size x size`` uint8."""
    shaped = []
    for image, (top, left, h, w) in zip(images, geometry[:, :4].tolist()):
        if resize is None:
            shaped.append(TF.resized_crop(image, top, left, h, w, [size, size], antialias=True))
        else:
            shaped.append(TF.center_crop(TF.resize(image, resize, antialias=True), size))
    batch = torch.stack(shaped).permute(0, 2, 3, 1)  # B x S x S x C for the batched crop-flip gather
    dy, dx, flip = geometry[:, 4:].to(batch.device, non_blocking=True).unbind(1)  # one small copy per batch
    return crop_flip(batch, None, dy, dx, flip.bool(), size, padding)


class DeviceDecoder:
    """Turns a collated encoded batch into uint8 images and labels on ``device`` (called in the main process)."""

    def __init__(self, device: torch.device, dataset: EncodedFolderTrain | EncodedFolderEval,
                 backend: str | None = None) -> None:
        self.device, self.size, self.padding, self.resize = device, dataset.size, dataset.padding, dataset.resize
        self.backend = backend or default_backend()
        if self.backend not in JPEG_BACKENDS:
            raise ValueError(f"unknown JPEG backend {self.backend!r}; valid choices: {', '.join(JPEG_BACKENDS)}")

    def __call__(self, batch, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's images (side ``size``, by default the dataset's) and labels on the device."""
        payloads, is_jpeg, geometry, labels = batch
        decoded = decode_all(payloads, is_jpeg, self.device, self.backend)
        resize = self.resize if size is None or self.resize is None else size  # training: resize to the side
        images = transform_batch(decoded, geometry, size or self.size, self.padding, resize)
        return images, labels.to(self.device, non_blocking=True)
