"""PCL Segment: interactive segmentation with positional contrastive learning.

The engine is pure Python (numpy, SimpleITK, torch, MONAI) and imports neither Slicer nor Qt,
so the same code runs in Slicer's console, in a worker process, on the command line and in
the browser app.
"""

__version__ = "0.1.0"
