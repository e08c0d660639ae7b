"""ImageFolder with JPEG decoding on the training device (``data.decode=device``).

DataLoader workers only read each file and work out its geometry (they parse the JPEG header for the image size,
then draw the same random-resized-crop / crop / flip parameters from ``(seed, epoch, index)`` as the PIL path).
The main process decodes the whole batch in one call (nvJPEG on CUDA) with TorchCodec's ``decode_jpeg`` when
``torchcodec`` is installed, else torchvision's (deprecated since torchvision 0.29 in favour of TorchCodec), then
crops, resizes (bilinear, antialiased) and flips each image on the device. Files that are not JPEG are decoded by
PIL in the worker and only transformed on the device.

Bad files: a worker that cannot read a file (or parse its header, or decode a non-JPEG) reads the next sample
instead (``imagefolder.read_first``); a JPEG the device decoder then refuses is decoded one by one on the host
(the backend's decoder, then PIL), and one that none accepts is replaced in the main process by the next sample
that decodes. Either way the substitute gets the original index's geometry (a pure function of seed, epoch and
index), and each batch says which samples were substituted and why (``DeviceDecoder.decode``).

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

from ddp_resnet.data.imagefolder import MAX_SEARCH, UnreadableImages, error_text, read_first, to_rgb
from ddp_resnet.data.transforms import crop_flip, crop_flip_params_one, rrc_params, sample_rng, unpack_item

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
# One row per sample: the random-resized-crop box (top, left, height, width; the whole image otherwise), then the
# crop-flip offsets (dy, dx) and the flip flag, all drawn in the worker exactly as the PIL path draws them.
GEOMETRY_FIELDS = ("top", "left", "height", "width", "dy", "dx", "flip")
EXIF_ORIENTATION = 0x0112


def _ends_jpeg(data: bytes) -> bool:
    """Whether the bytes end with the JPEG end-of-image marker (trailing zero padding allowed)."""
    return data.endswith(JPEG_EOI) or data.rstrip(b"\x00").endswith(JPEG_EOI)


def read_encoded(path: str) -> tuple[torch.Tensor, bool, int, int]:
    """``(payload, is_jpeg, width, height)``: the file's bytes for a JPEG (size from its header), otherwise the
    image decoded to ``3 x H x W`` uint8 by PIL (``imagefolder.to_rgb``: 16-bit images scaled, not clipped).

    A JPEG with an EXIF orientation tag is decoded here by PIL too: like torchvision's ImageFolder, the PIL path
    ignores the tag, while TorchCodec's decoder applies it (and would swap height and width). So is a JPEG whose
    bytes do not end with the end-of-image marker (truncated, or with trailing data): PIL then raises for a
    truncated file, and the sample is substituted here rather than decoded half grey on the device.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    with Image.open(io.BytesIO(data)) as img:  # reads the header only, until to_rgb()
        width, height = img.size
        if data[:3] == JPEG_MAGIC and _ends_jpeg(data) and img.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, width, height
        return TF.pil_to_tensor(to_rgb(img)), False, width, height


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


class _EncodedItems(Dataset):
    """What both encoded datasets share: reading sample ``index`` (or its substitute) with the geometry of
    ``index``. Items are ``(payload, is_jpeg, geometry, label, (index, key, source), bad)``: ``source`` is the
    sample whose file was read, ``bad`` the ``(path, reason)`` of ``index`` when that was not ``index`` itself."""

    samples: Sequence[tuple[str, int]]
    size: int
    padding: int
    resize: int | None

    def __len__(self) -> int:
        return len(self.samples)

    def geometry(self, width: int, height: int, key: int, index: int) -> list[int]:
        """The geometry row of sample ``index`` (augmentation key ``key``) for an image of this size."""
        raise NotImplementedError

    def item_from(self, start: int, index: int, key: int) -> tuple:
        """Sample ``index``'s item read from the first readable sample at or after ``start``."""
        source, (payload, is_jpeg, width, height), bad = read_first(self.samples, start, read_encoded)
        geometry = self.geometry(width, height, key, index)
        return payload, is_jpeg, geometry, self.samples[source][1], (index, key, source), bad


class EncodedFolderTrain(_EncodedItems):
    """Training items ``(index, epoch[, repeat])`` -> ``(payload, is_jpeg, geometry, label, where, bad)``.

    ``resize`` is what the decoder does before the crop-flip: ``None`` for a random-resized crop to ``size``,
    else resize the shorter side to ``size`` and center-crop (as ``_FolderTrainDataset``).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, augment: str, padding: int, seed: int):
        self.samples, self.size, self.augment, self.seed = samples, size, augment, seed
        self.padding = padding if augment == "crop_flip" else 0
        self.resize = None if augment == "rrc_flip" else size

    def geometry(self, width: int, height: int, key: int, index: int) -> list[int]:
        """The PIL path's draws for sample ``index`` under key ``key``."""
        return train_geometry(width, height, self.augment, self.padding, self.seed, key, index)

    def __getitem__(self, item: tuple[int, ...]):
        index, _, key = unpack_item(item)
        return self.item_from(index, index, key)


class EncodedFolderEval(_EncodedItems):
    """Evaluation items ``index`` -> ``(payload, is_jpeg, geometry, label, where, bad)``: resize the shorter side
    to ``resize``, center-crop ``size``."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, resize: int):
        self.samples, self.size, self.resize, self.padding = samples, size, resize, 0

    def geometry(self, width: int, height: int, key: int, index: int) -> list[int]:
        """The whole image."""
        return [0, 0, height, width, 0, 0, 0]

    def __getitem__(self, index: int):
        return self.item_from(index, index, 0)


def collate_encoded(items: list) -> tuple:
    """Batch of encoded items: payloads stay a list (they differ in length), geometry and labels are stacked,
    ``where`` and ``bad`` stay per-sample lists."""
    payloads, is_jpeg, geometry, labels, where, bad = zip(*items)
    return (list(payloads), list(is_jpeg), torch.tensor(geometry, dtype=torch.int64), torch.tensor(labels),
            list(where), list(bad))


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


def _pil_decode(data: torch.Tensor) -> torch.Tensor:
    """A JPEG payload decoded by PIL (the workers' decoder): the last resort before a file counts as bad."""
    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
        return TF.pil_to_tensor(to_rgb(img))


def decode_one(payload: torch.Tensor, is_jpeg: bool, device: torch.device,
               backend: str = "torchvision") -> tuple[torch.Tensor | None, str]:
    """``(3 x H x W uint8 on device, "")``, or ``(None, reason)`` when neither the backend's host decoder nor PIL
    decodes the JPEG (the reason is the backend's)."""
    if not is_jpeg:
        return payload.to(device), ""
    try:
        return JPEG_BACKENDS[backend](payload).to(device), ""
    except Exception as exc:  # noqa: BLE001 - any decoder failure: try PIL, then report
        reason = error_text(exc)
    try:
        return _pil_decode(payload).to(device), ""
    except Exception:  # noqa: BLE001
        return None, reason


def decode_all(payloads: list[torch.Tensor], is_jpeg: list[bool], device: torch.device,
               backend: str = "torchvision") -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """``3 x H x W`` uint8 images on ``device`` (the JPEGs decoded there in one batched call) and, by position,
    why the images that no decoder accepts failed (their place in the list is None)."""
    decode_jpeg = JPEG_BACKENDS[backend]
    out: list[torch.Tensor | None] = [None] * len(payloads)
    failed: dict[int, str] = {}
    jpegs = [i for i, flag in enumerate(is_jpeg) if flag]
    if jpegs:
        try:
            for i, image in zip(jpegs, decode_jpeg([payloads[i] for i in jpegs], device=device)):
                out[i] = image
        except Exception:  # noqa: BLE001 - a CMYK or progressive file the device decoder refuses, or a corrupt one
            for i in jpegs:
                out[i], reason = decode_one(payloads[i], True, device, backend)
                if out[i] is None:
                    failed[i] = reason
    for i, flag in enumerate(is_jpeg):
        if not flag:
            out[i] = payloads[i].to(device)
    return out, failed


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
    """Turns a collated encoded batch into uint8 images and labels on ``device`` (called in the main process).

    A JPEG that no decoder accepts is replaced as the workers replace unreadable files: by the next sample after
    the one read that decodes, with the geometry (augmentation keys) of the original index, reported as bad.
    """

    def __init__(self, device: torch.device, dataset: EncodedFolderTrain | EncodedFolderEval,
                 backend: str | None = None) -> None:
        self.device, self.size, self.padding, self.resize = device, dataset.size, dataset.padding, dataset.resize
        self.dataset = dataset
        self.backend = backend or default_backend()
        if self.backend not in JPEG_BACKENDS:
            raise ValueError(f"unknown JPEG backend {self.backend!r}; valid choices: {', '.join(JPEG_BACKENDS)}")

    def _substitute(self, where: tuple[int, int, int]) -> tuple[torch.Tensor, list[int], int]:
        """``(image, geometry row, label)`` of sample ``index`` from the first sample after ``source`` that
        decodes, with ``index``'s geometry."""
        index, key, source = where
        for _ in range(MAX_SEARCH):
            payload, is_jpeg, geometry, label, (_, _, source), _ = self.dataset.item_from(source + 1, index, key)
            image, _ = decode_one(payload, is_jpeg, self.device, self.backend)
            if image is not None:
                return image, geometry, label
        raise UnreadableImages(f"no sample after {self.dataset.samples[index][0]} decodes ({MAX_SEARCH} tried)")

    def decode(self, batch, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        """``(images, labels, bad)``: the batch's images (side ``size``, by default the dataset's) and labels on
        the device, and ``(path, reason)`` of each substituted sample in batch order."""
        payloads, is_jpeg, geometry, labels, where, bad = batch
        decoded, failed = decode_all(payloads, is_jpeg, self.device, self.backend)
        bad = list(bad)
        if failed:
            geometry, labels = geometry.clone(), labels.clone()
            for i, reason in failed.items():
                decoded[i], row, label = self._substitute(where[i])
                geometry[i], labels[i] = torch.tensor(row), label
                bad[i] = bad[i] or (self.dataset.samples[where[i][0]][0], reason)
        resize = self.resize if size is None or self.resize is None else size  # training: resize to the side
        images = transform_batch(decoded, geometry, size or self.size, self.padding, resize)
        return images, labels.to(self.device, non_blocking=True), [flag for flag in bad if flag]

    def __call__(self, batch, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's images (side ``size``, by default the dataset's) and labels on the device."""
        images, labels, _ = self.decode(batch, size)
        return images, labels
