"""Data: images, datasets, the synthetic pedestrian generator and multi-crop augmentation.

Every dataset yields one labelled-sample structure, a dict with these keys (optional ones
present only when the dataset has that label):
    "image"      uint8 tensor (3, H, W), RGB
    "index"      int, position in the dataset
    "path"       str, source file
    "pid"        int identity, -1 if unknown
    "camera"     int camera id, -1 if unknown
    "attributes" float32 tensor (A,): 1 / 0, NaN where unknown; names in dataset.attribute_names
    "parts"      int64 tensor (H, W) part mask over dataset.part_names, -1 = ignore
    "keypoints"  float32 tensor (K, 3): x, y in pixels of "image", visibility (0 = absent)
    "caption"    str
and, where they apply:
    "box"        float32 tensor (4,): x0, y0, x1, y1 of a crop in its source image (COCO)
    "skipped"    list[str]: unreadable files replaced by this sample (on_error="replace")

`build_dataset(format, root, split)` opens any supported format (folder, synth, market,
idfolder, peta, ccp, coco, cuhk-pedes); `MultiCrop` and `EvalTransform` turn samples into
model inputs with their label maps and keypoints following the geometry; `collate_samples`
batches them.
"""

from clasp.data.base import FailedSample, LabelReadError, PersonDataset
from clasp.data.build import FORMATS, build_dataset
from clasp.data.collate import collate_samples
from clasp.data.images import ImageReadError, list_images, read_rgb
from clasp.data.transforms import EvalTransform, MultiCrop

__all__ = [
    "FORMATS",
    "EvalTransform",
    "FailedSample",
    "ImageReadError",
    "LabelReadError",
    "MultiCrop",
    "PersonDataset",
    "build_dataset",
    "collate_samples",
    "list_images",
    "read_rgb",
]
