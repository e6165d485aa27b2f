"""A dataset with fewer, thicker slices: every N-th slice of each volume and its label map.

PCL's fixed threshold (0.1 of a volume's extent) was chosen for CT volumes of 100-200 slices; a
cardiac MRI stack has about 10, where 0.1 leaves only slices at the same index as positives
(the issue this measures). CHAOS T2 has 31-46 slices of 7.7 mm; every 4th slice gives 8-12
slices of 31 mm, a stack shaped like a cardiac one, with the same anatomy and labels, so the
threshold options (``--threshold-slices``, ``--threshold-mm``) can be measured where they
change the positives:

    python benchmarks/thin_out.py --data ../shared/data/chaos-t2 --every 4 --out runs/chaos-every4
    python benchmarks/pretrain_length.py --data runs/chaos-every4 --epochs 50 --out runs/thin

The slice axis is the through-plane (largest-spacing) axis, as the engine's ``auto``; the
kept slices are ``offset, offset + N, ...`` with the geometry of the thinned grid (spacing times
N along that axis). ``dataset.json`` is copied beside the labels, and the source stays as it is.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from dataset_runs import chosen_images


def thinned(image: sitk.Image, every: int, offset: int) -> sitk.Image:
    """Every ``every``-th slice of ``image`` along its largest-spacing axis, from ``offset``."""
    axis = int(np.argmax(image.GetSpacing()))
    index = [slice(None)] * image.GetDimension()
    index[axis] = slice(offset, None, every)
    return image[tuple(index)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="imagesTr + labelsTr folder")
    parser.add_argument("--every", type=int, default=4, help="keep every N-th slice")
    parser.add_argument("--offset", type=int, default=0, help="the first slice kept")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.every < 1 or not 0 <= args.offset < args.every:
        raise SystemExit("--every must be at least 1 and --offset in [0, every)")
    for folder in ("imagesTr", "labelsTr"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    counts = []
    for image_path in chosen_images(args.data, None, None):
        label_path = args.data / "labelsTr" / image_path.name
        image = thinned(sitk.ReadImage(str(image_path)), args.every, args.offset)
        label = thinned(sitk.ReadImage(str(label_path)), args.every, args.offset)
        sitk.WriteImage(image, str(args.out / "imagesTr" / image_path.name), True)
        sitk.WriteImage(label, str(args.out / "labelsTr" / image_path.name), True)
        counts.append(image.GetSize()[int(np.argmax(image.GetSpacing()))])
    shutil.copy(args.data / "dataset.json", args.out / "dataset.json")
    print(f"{len(counts)} volumes of {min(counts)}-{max(counts)} slices -> {args.out}")


if __name__ == "__main__":
    main()
