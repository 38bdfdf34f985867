"""Cheaper JPEG decoding for the training crop on the CPU path: Pillow's draft mode.

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size by scaling in the DCT domain, which skips most of the
decoding work. RandomResizedCrop draws its box as a fraction of the image's area and an aspect ratio, so on a
reduced image it draws the same boxes relative to the picture (up to the rounding of a box side to whole
pixels). Decoding reduced is therefore safe when every box it can draw on the reduced image still spans at
least the output size on both sides: the crop remains a downscale and only the resampling path changes
(a DCT-domain reduction then an antialiased resize, instead of one antialiased resize). Images that small
crops would enlarge are decoded at full size.
"""
import math

from timm.data.transforms import RandomResizedCropAndInterpolation


class JpegDraft:
    """Called on an opened, not yet decoded image: switches a JPEG to the largest safe draft reduction for
    `crop` (timm's RandomResizedCrop). A class, not a closure, so that spawned loader workers can pickle it."""

    def __init__(self, crop):
        # the shortest side any box can have: area min(scale) * W * H at the most elongated allowed aspect ratio
        self.shortest_fraction = math.sqrt(min(crop.scale) * min(min(crop.ratio), 1 / max(crop.ratio)))
        self.out_side = max(crop.size)

    def reduction(self, width, height):
        """1, 2, 4 or 8: the largest factor at which every box still spans the output size on both sides."""
        shortest = self.shortest_fraction * math.sqrt(width * height)
        factor = 1
        while factor < 8 and shortest / (2 * factor) >= self.out_side:
            factor *= 2
        return factor

    def __call__(self, image):
        if image.format == 'JPEG':
            factor = self.reduction(*image.size)
            if factor > 1:
                image.draft('RGB', (math.ceil(image.size[0] / factor), math.ceil(image.size[1] / factor)))


def draft_for_random_crop(transform):
    """JpegDraft for the first RandomResizedCrop of `transform` (a torchvision Compose); None when it has none."""
    crops = [t for t in getattr(transform, 'transforms', []) if isinstance(t, RandomResizedCropAndInterpolation)]
    return JpegDraft(crops[0]) if crops else None
