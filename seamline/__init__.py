"""seamline: edge-cloud split inference for transformer language models.

The subpackages live in top-level folders of the repository (see README, "Layout"):
``seamline.protos`` (protos/), ``seamline.partitioner`` (partitioner/),
``seamline.edge`` (edge/), ``seamline.cloud`` (cloud/). This folder holds only the
command-line front door.
"""

__version__ = "0.1.0"
