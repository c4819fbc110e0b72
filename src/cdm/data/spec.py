"""What an image is: its height, width and channels (:class:`ImageSpec`), carried by every source, backbone
codec and sample file.

Stored images are uint8: grey ones as ``(N, H, W)`` (so MNIST's arrays and their hashes are what they always
were), colour ones as ``(N, H, W, 3)`` RGB. Pixels are 0..255; for the digits white ink on black.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import DataError

__all__ = ["CHANNELS", "MNIST_SPEC", "ImageSpec"]

CHANNELS = (1, 3)  # grey, RGB


@dataclass(frozen=True)
class ImageSpec:
    height: int = 28
    width: int = 28
    channels: int = 1  # 1: grey, stored (N, H, W); 3: RGB, stored (N, H, W, 3)

    def __post_init__(self) -> None:
        problems = []
        for name in ("height", "width", "channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if not problems and self.channels not in CHANNELS:
            problems.append(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if problems:
            raise DataError("image spec: " + "; ".join(problems))

    @property
    def shape(self) -> tuple[int, ...]:
        """One stored image's array shape: (H, W) grey, (H, W, 3) RGB."""
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, self.channels)

    def __str__(self) -> str:
        return f"{self.height}x{self.width} {'grey' if self.channels == 1 else 'RGB'}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        unknown = sorted(set(d) - {"height", "width", "channels"})
        if unknown:
            raise DataError(f"image spec: unknown fields {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def of(cls, images: np.ndarray, what: str = "images") -> ImageSpec:
        """The spec of a stored uint8 image array ``(N, H, W)`` or ``(N, H, W, 3)``; DataError otherwise."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise DataError(f"{what}: images must be a uint8 array, got {got}")
        if images.ndim == 3:
            return cls(int(images.shape[1]), int(images.shape[2]), 1)
        if images.ndim == 4 and images.shape[-1] == 3:
            return cls(int(images.shape[1]), int(images.shape[2]), 3)
        raise DataError(f"{what}: images have shape {images.shape}, expected (N, H, W) grey or (N, H, W, 3) RGB")

    def check(self, images: np.ndarray, what: str = "images") -> None:
        """DataError unless ``images`` are stored images of this spec."""
        got = ImageSpec.of(images, what)
        if got != self:
            raise DataError(f"{what}: images are {got}, expected {self}")


MNIST_SPEC = ImageSpec(28, 28, 1)
