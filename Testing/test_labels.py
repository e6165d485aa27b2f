"""Label names and values: a label map may only hold values its dataset.json (or the session)
names; anything else is an error naming the values and the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig
from pclseg.errors import PCLSegError
from pclseg.finetune import finetune
from pclseg.io import read_label, read_volume
from pclseg.labels import (
    Label,
    check_label_values,
    labels_from_names,
    named_labels,
    names_of,
    unknown_values,
)
from pclseg.session import RefineSession

TINY = FinetuneConfig(epochs=1, batch_size=2, min_steps_per_epoch=1, device="cpu",
                      model=ModelConfig(features=4), preprocess=PreprocessConfig(size=32))


def test_unknown_values_are_those_neither_background_nor_named():
    labels = labels_from_names({1: "liver", 3: "spleen"})
    array = np.array([[0, 1, 2], [3, 7, 2]])
    assert unknown_values(array, labels) == [2, 7]
    with pytest.raises(PCLSegError) as error:
        check_label_values(array, labels, "lab.nii.gz", "dataset.json")
    assert str(error.value) == (
        "lab.nii.gz: label value(s) 2, 7 not named in dataset.json (which names 0 background, "
        "1 liver, 3 spleen); name them there or fix the label map"
    )
    check_label_values(np.array([0, 1, 3]), labels, "lab.nii.gz", "dataset.json")


def test_named_labels_come_from_the_caller_or_the_dataset_json(tmp_path):
    labels_dir = tmp_path / "labelsTr"
    labels_dir.mkdir()
    assert named_labels(labels_dir, None) is None
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background",
                                                                  "1": "liver"}}))
    found, where = named_labels(labels_dir, None)
    assert [label.name for label in found] == ["liver"] and where.endswith("dataset.json")
    given = [Label(2, "spleen", (1, 2, 3))]
    assert named_labels(labels_dir, given) == (given, "the given label names")


@pytest.fixture
def an_msd_copy(a_sample_folder, tmp_path) -> Path:
    """The sample's first image and label map with a dataset.json that names only the liver."""
    root = tmp_path / "task"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        shutil.copy(a_sample_folder / sub / "sample_01.nii.gz", root / sub)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    return root


def test_finetuning_on_labels_the_dataset_json_does_not_name_is_an_error(an_msd_copy, tmp_path):
    label_path = an_msd_copy / "labelsTr" / "sample_01.nii.gz"
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    values = sorted(set(np.unique(stored).tolist()) - {0, 1})
    assert values  # the sample holds kidneys and a spleen too
    with pytest.raises(PCLSegError) as error:
        finetune(an_msd_copy / "imagesTr", an_msd_copy / "labelsTr", tmp_path / "model", TINY)
    message = str(error.value)
    assert message.startswith(f"{label_path}: label value(s) {', '.join(map(str, values))} not "
                              f"named in {an_msd_copy / 'dataset.json'}")
    assert not (tmp_path / "model" / "checkpoint.json").exists()


def test_a_session_refuses_annotations_with_values_it_has_no_label_for(a_sample_folder):
    image = a_sample_folder / "imagesTr" / "sample_01.nii.gz"
    truth = read_label(a_sample_folder / "labelsTr" / "sample_01.nii.gz", read_volume(image))
    session = RefineSession.from_encoder(image, None, TINY, [Label(1, "liver", (1, 1, 1)),
                                                              Label(4, "spleen", (2, 2, 2))])
    with pytest.raises(PCLSegError, match=r"annotations: label value\(s\) 2, 3 not named in the "
                                          r"session's labels \(which names 0 background, 1 liver, "
                                          r"4 spleen\)"):
        session.set_annotations(truth)
    session.set_annotations(np.where(np.isin(truth, (2, 3)), 0, truth))
    with pytest.raises(PCLSegError, match=r"slice 3: label value\(s\) 2 not named"):
        session.add_annotation(3, np.full(truth.shape[1:], 2))


def test_names_of_follows_the_labels_order_and_skips_unknown_values() -> None:
    labels = labels_from_names(["liver", "right kidney", "spleen"])
    assert names_of(labels, [3, 1, 7]) == ["liver", "spleen"]
    assert names_of(labels, []) == []
