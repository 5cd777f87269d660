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
"""
