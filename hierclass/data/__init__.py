"""Dump readers: the BSON offset index, random access, image datasets and splits.

Nothing here loads a dump into memory: a dump is indexed in one sequential pass
(:func:`build_index`) and products are then read one document at a time.
"""

from hierclass.data.bson_index import BsonIndex, IndexReport, build_index, load_index, scan_dump
from hierclass.data.datasets import (
    PREPROCESS,
    EvalTransform,
    ImageDataset,
    ProductDataset,
    collate_images,
    collate_products,
    decode_image,
    image_rows,
    resolve_transform,
    to_uint8_tensor,
)
from hierclass.data.sources import (
    BsonDump,
    CsvCatalogue,
    FolderCatalogue,
    ImageSource,
    import_catalogue,
    open_source,
    products_of,
    source_skus,
    write_dump,
)
from hierclass.data.splits import holdout_mask, split_dump, split_products
from hierclass.data.synthetic import make_jpeg, synthetic_products

__all__ = [
    "PREPROCESS",
    "BsonDump",
    "BsonIndex",
    "CsvCatalogue",
    "EvalTransform",
    "FolderCatalogue",
    "ImageDataset",
    "ImageSource",
    "IndexReport",
    "ProductDataset",
    "build_index",
    "collate_images",
    "collate_products",
    "decode_image",
    "image_rows",
    "import_catalogue",
    "load_index",
    "make_jpeg",
    "open_source",
    "resolve_transform",
    "scan_dump",
    "holdout_mask",
    "source_skus",
    "split_dump",
    "split_products",
    "synthetic_products",
    "to_uint8_tensor",
    "products_of",
    "write_dump",
]
