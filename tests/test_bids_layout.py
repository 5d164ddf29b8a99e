from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from ihf_bids.bids import (
    DWIRun,
    SessionInputs,
    check_bids_dataset,
    check_output_paths,
    collect_inputs,
    load_bids_filters,
    load_metadata,
    normalize_labels,
)
from ihf_bids.errors import InputDataError, UsageError

REALBIDS = Path("/work/shared/data/realbids")
needs_realbids = pytest.mark.skipif(not REALBIDS.is_dir(), reason=f"real dataset not available at {REALBIDS}")


def make_dataset(root: Path, files: dict[str, str | dict | None]) -> Path:
    """A small BIDS tree: ``{relative path: text, JSON dict or None (empty file)}``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            path.write_text(json.dumps(content))
        else:
            path.write_text(content or "")
    return root


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------- #
# the phantom
# --------------------------------------------------------------------------- #
def test_collect_phantom_all_sessions(tiny_phantom):
    root = tiny_phantom.root
    before = _snapshot(root)
    sessions = collect_inputs(root)
    assert _snapshot(root) == before  # no database or cache written inside the dataset
    assert [s.key for s in sessions] == [
        (sub, site) for sub in ("01", "02", "03") for site in ("ge", "philips", "siemens")
    ]
    for s in sessions:
        assert isinstance(s, SessionInputs)
        assert s.t1w == (tiny_phantom.image_path(s.subject, s.session, "T1w"),)
        assert s.t2w == (tiny_phantom.image_path(s.subject, s.session, "T2w"),)
        (run,) = s.dwi
        assert isinstance(run, DWIRun)
        assert run.nifti == tiny_phantom.image_path(s.subject, s.session, "dwi")
        stem = str(run.nifti)[: -len(".nii.gz")]
        assert run.bval == Path(stem + ".bval") and run.bvec == Path(stem + ".bvec")
        assert run.sidecar == Path(stem + ".json")
        assert run.entities["suffix"] == "dwi" and run.entities["sub"] == s.subject
        assert s.images == (*s.t1w, *s.t2w, run.nifti)
    # derivatives/phantom (truth) is not collected
    assert not any("derivatives" in str(p) for s in sessions for p in s.images)


def test_collect_phantom_labels_and_modalities(tiny_phantom):
    root = tiny_phantom.root
    sessions = collect_inputs(root, participant_labels=["sub-02", "02"], session_labels=["ses-ge"], modalities=("dwi",))
    assert [s.key for s in sessions] == [("02", "ge")]
    assert sessions[0].t1w == () and sessions[0].t2w == () and len(sessions[0].dwi) == 1
    assert sessions[0].entities == {"subject": "02", "session": "ge"} and sessions[0].label == "sub-02_ses-ge"


def test_unknown_labels_list_what_exists(tiny_phantom):
    with pytest.raises(UsageError) as err:
        collect_inputs(tiny_phantom.root, participant_labels=["07", "01"])
    message = str(err.value)
    assert "07" in message and "01, 02, 03" in message and "container" in message
    with pytest.raises(UsageError, match=r"session label\(s\) nope .*found: ge, philips, siemens"):
        collect_inputs(tiny_phantom.root, session_labels=["nope"])


# --------------------------------------------------------------------------- #
# labels
# --------------------------------------------------------------------------- #
def test_normalize_labels():
    assert normalize_labels(None, "sub") is None
    assert normalize_labels(["sub-03", "01", "03", " sub-01 "], "sub") == ["01", "03"]
    assert normalize_labels(["ses-B", "A"], "ses-") == ["A", "B"]
    for bad in ("sub-01/", "./sub-01", "/data/sub-01", "~/x", "0 1", "sub-01_ses-A", "é"):
        with pytest.raises(UsageError):
            normalize_labels([bad], "sub")
    with pytest.raises(UsageError, match="separate several labels with spaces"):
        normalize_labels(["01,02"], "sub")


# --------------------------------------------------------------------------- #
# filters, entities and inheritance on small synthetic trees
# --------------------------------------------------------------------------- #
@pytest.fixture
def entity_dataset(tmp_path):
    return make_dataset(
        tmp_path / "ds",
        {
            "T1w.json": {"Manufacturer": "Siemens", "RepetitionTime": 2.0},
            "dwi.bval": "0 1000\n",
            "sub-01/ses-A/anat/sub-01_ses-A_rec-norm_T1w.nii.gz": None,
            "sub-01/ses-A/anat/sub-01_ses-A_rec-nonorm_T1w.nii.gz": None,
            "sub-01/ses-A/anat/sub-01_ses-A_rec-nonorm_T1w.json": {"RepetitionTime": 2.3},
            "sub-01/ses-A/anat/sub-01_ses-A_T1w.nii": None,
            "sub-01/ses-A/dwi/sub-01_ses-A_dir-AP_dwi.nii.gz": None,
            "sub-01/ses-A/dwi/sub-01_ses-A_dir-AP_dwi.bvec": "0 1\n0 0\n0 0\n",
            "sub-01/ses-A/dwi/sub-01_ses-A_dir-PA_dwi.nii.gz": None,
            "sub-01/ses-A/dwi/sub-01_ses-A_dir-PA_dwi.bval": "0 2000\n",
            "sub-01/ses-A/dwi/sub-01_ses-A_dir-PA_dwi.json": {"PhaseEncodingDirection": "j"},
            "sub-01/ses-B/anat/sub-01_ses-B_run-1_T1w.nii.gz": None,
            "sub-01/ses-B/anat/sub-01_ses-B_run-2_T1w.nii.gz": None,
            "sub-01/ses-B/func/sub-01_ses-B_task-rest_bold.nii.gz": None,
            "sub-01/ses-C/func/sub-01_ses-C_task-rest_bold.nii.gz": None,
        },
    )


def _names(paths):
    return [Path(p).name for p in paths]


def test_entities_inheritance_and_missing_companions(entity_dataset, caplog):
    root = entity_dataset
    with caplog.at_level(logging.WARNING, logger="ihf_bids.bids"):
        sessions = collect_inputs(root)
    assert [s.key for s in sessions] == [("01", "A"), ("01", "B")]  # ses-C has no T1w/T2w/dwi
    assert "sub-01_ses-C" in caplog.text and "skipped" in caplog.text
    a, b = sessions
    assert _names(a.t1w) == [
        "sub-01_ses-A_T1w.nii",
        "sub-01_ses-A_rec-nonorm_T1w.nii.gz",
        "sub-01_ses-A_rec-norm_T1w.nii.gz",
    ]
    ap, pa = a.dwi
    assert ap.bval == root / "dwi.bval"  # inherited from the top level
    assert ap.bvec.name == "sub-01_ses-A_dir-AP_dwi.bvec" and ap.sidecar is None
    assert pa.bval.name == "sub-01_ses-A_dir-PA_dwi.bval" and pa.bvec is None  # missing: reported later
    assert pa.sidecar.name == "sub-01_ses-A_dir-PA_dwi.json"
    assert _names(b.t1w) == ["sub-01_ses-B_run-1_T1w.nii.gz", "sub-01_ses-B_run-2_T1w.nii.gz"]
    # metadata: top-level T1w.json, overridden by the more specific sidecar; rec-norm gets only the top level
    nonorm = load_metadata(a.t1w[1], root)
    assert nonorm == {"Manufacturer": "Siemens", "RepetitionTime": 2.3}
    assert load_metadata(a.t1w[2], root) == {"Manufacturer": "Siemens", "RepetitionTime": 2.0}


def test_bids_filter_semantics(entity_dataset, tmp_path):
    root = entity_dataset

    def t1w(filters):
        return [name for s in collect_inputs(root, bids_filters=filters, modalities=("T1w",)) for name in _names(s.t1w)]

    assert t1w({"t1w": {"reconstruction": "norm"}}) == ["sub-01_ses-A_rec-norm_T1w.nii.gz"]
    assert t1w({"T1w": {"rec": None, "run": None}}) == ["sub-01_ses-A_T1w.nii"]  # null = entity absent
    assert t1w({"t1w": {"run": "*"}}) == ["sub-01_ses-B_run-1_T1w.nii.gz", "sub-01_ses-B_run-2_T1w.nii.gz"]
    assert t1w({"t1w": {"run": 2}}) == ["sub-01_ses-B_run-2_T1w.nii.gz"]
    assert t1w({"t1w": {"reconstruction": ["norm", "nonorm"]}}) == [
        "sub-01_ses-A_rec-nonorm_T1w.nii.gz", "sub-01_ses-A_rec-norm_T1w.nii.gz"]  # fmt: skip
    dwi = collect_inputs(root, bids_filters={"dwi": {"direction": "PA"}}, modalities=("dwi",))
    assert [run.nifti.name for s in dwi for run in s.dwi] == ["sub-01_ses-A_dir-PA_dwi.nii.gz"]

    good = tmp_path / "filters.json"
    good.write_text(json.dumps({"t1w": {"acquisition": None, "reconstruction": "nonorm"}}))
    assert load_bids_filters(good) == {"T1w": {"acquisition": None, "reconstruction": "nonorm"}}
    assert t1w(good) == ["sub-01_ses-A_rec-nonorm_T1w.nii.gz"]
    nothing = _write(tmp_path / "nothing.json", {"t1w": {"rec": "absent"}})
    with pytest.raises(InputDataError, match="nothing.json"):  # names the filter file
        collect_inputs(root, bids_filters=nothing, modalities=("T1w",))


def _write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object keyed by query"),
        ({"bold": {"task": "rest"}}, "unknown query 'bold'"),
        ({"t1w": "norm"}, "must be an object"),
        ({"t1w": {"rec": {"a": 1}}}, "t1w.reconstruction"),
        ({"t1w": {"rec": [None, "norm"]}}, "cannot be list items"),
        ({"t1w": {"rec": True}}, "t1w.reconstruction"),
    ],
)
def test_malformed_filter_files(tmp_path, content, match):
    path = _write(tmp_path / "bad_filters.json", content)
    with pytest.raises(UsageError, match=match) as err:
        load_bids_filters(path)
    assert "bad_filters.json" in str(err.value)
    with pytest.raises(UsageError, match="cannot be read"):
        load_bids_filters(tmp_path / "missing.json")


def test_unknown_entity_in_filters(entity_dataset, tmp_path):
    path = _write(tmp_path / "filters.json", {"t1w": {"flavour": "x"}})
    with pytest.raises(UsageError, match="filters.json"):
        collect_inputs(entity_dataset, bids_filters=path)


def test_dataset_without_sessions(tmp_path):
    root = make_dataset(tmp_path / "flat", {
        "sub-01/anat/sub-01_T1w.nii.gz": None,
        "sub-02/dwi/sub-02_dwi.nii.gz": None,
        "sub-02/dwi/sub-02_dwi.bval": "0\n",
    })  # fmt: skip
    sessions = collect_inputs(root)
    assert [s.key for s in sessions] == [("01", None), ("02", None)]
    assert sessions[0].label == "sub-01" and sessions[0].entities == {"subject": "01"}
    assert sessions[1].dwi[0].bval.name == "sub-02_dwi.bval" and sessions[1].dwi[0].bvec is None
    with pytest.raises(UsageError, match="found: none"):
        collect_inputs(root, session_labels=["A"])


def test_no_images(tmp_path):
    root = make_dataset(tmp_path / "func_only", {"sub-01/func/sub-01_task-rest_bold.nii.gz": None})
    with pytest.raises(InputDataError, match="no T1w, T2w, dwi images"):
        collect_inputs(root)
    empty = make_dataset(tmp_path / "empty", {})
    with pytest.raises(InputDataError, match="no sub-<label> folders"):
        collect_inputs(empty)
    with pytest.raises(UsageError, match="unknown modalities"):
        collect_inputs(root, modalities=("FLAIR",))


# --------------------------------------------------------------------------- #
# dataset and output checks
# --------------------------------------------------------------------------- #
def test_check_bids_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    assert check_bids_dataset(root) == root.absolute()
    with pytest.raises(UsageError, match="does not exist"):
        check_bids_dataset(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="not a directory"):
        check_bids_dataset(root / "dataset_description.json")
    with pytest.raises(UsageError, match=f"dataset root seems to be {root}"):
        check_bids_dataset(root / "sub-01")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="no dataset_description.json"):
        check_bids_dataset(tmp_path / "plain")
    (root / "dataset_description.json").write_text("{broken")
    with pytest.raises(InputDataError, match="dataset_description.json cannot be read as JSON"):
        check_bids_dataset(root)
    (root / "dataset_description.json").write_text("[]")
    with pytest.raises(InputDataError, match="JSON object"):
        check_bids_dataset(root)


def test_check_output_paths(tmp_path):
    bids = make_dataset(tmp_path / "bids", {})
    out, work = check_output_paths(bids, bids / "derivatives" / "ihf-bids", tmp_path / "work")
    assert out == bids / "derivatives" / "ihf-bids" and work == tmp_path / "work"
    assert check_output_paths(bids, tmp_path / "out")[1] is None
    for bad in (bids, bids / "derivatives", bids / "sub-01" / "out", bids / "out"):
        with pytest.raises(UsageError, match="inside the input dataset"):
            check_output_paths(bids, bad, tmp_path / "work")
    for bad_work in (bids / "work", bids / "derivatives" / "work", bids):
        with pytest.raises(UsageError, match="work directory .* inside the input dataset"):
            check_output_paths(bids, tmp_path / "out", bad_work)
    for bad_work in (tmp_path / "out", tmp_path / "out" / "work"):
        with pytest.raises(UsageError, match="is \\(inside\\) OUTPUT_DIR"):
            check_output_paths(bids, tmp_path / "out", bad_work)
    assert check_output_paths(bids, tmp_path / "scratch" / "out", tmp_path / "scratch")[1] == tmp_path / "scratch"
    # a symlink into the dataset is seen through
    (tmp_path / "link").symlink_to(bids, target_is_directory=True)
    with pytest.raises(UsageError, match="inside the input dataset"):
        check_output_paths(bids, tmp_path / "link" / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        check_output_paths(bids, tmp_path / "file")
    with pytest.raises(UsageError, match="not writable"):
        check_output_paths(bids, tmp_path / "file" / "out")
    with pytest.raises(UsageError, match="work directory .* not writable"):
        check_output_paths(bids, tmp_path / "out", tmp_path / "file" / "work")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_check_output_paths_not_writable(tmp_path):
    bids = make_dataset(tmp_path / "bids", {})
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="not writable"):
            check_output_paths(bids, locked / "out")
    finally:
        locked.chmod(0o700)


@needs_realbids
def test_check_output_paths_read_only_dataset():
    # The real dataset is read-only: derivatives/<name> is accepted by location but cannot be created.
    if os.access(REALBIDS, os.W_OK):
        pytest.skip("the real dataset is writable here")
    with pytest.raises(UsageError, match="not writable"):
        check_output_paths(REALBIDS, REALBIDS / "derivatives" / "ihf-bids")


# --------------------------------------------------------------------------- #
# the real dataset
# --------------------------------------------------------------------------- #
@needs_realbids
def test_collect_realbids():
    sessions = collect_inputs(REALBIDS)
    by_subject = {s.subject: s for s in sessions}
    assert sorted(by_subject) == ["GHUPARIS01", "IU01", "IXI012", "PHBLR01", "PHGANJI01", "PHNOTT01"]
    assert all(s.session is not None for s in sessions)
    iu = by_subject["IU01"]
    assert _names(iu.t1w) == ["sub-IU01_ses-siemensprismafitxa30_rec-nonorm_T1w.nii.gz",
                              "sub-IU01_ses-siemensprismafitxa30_rec-norm_T1w.nii.gz"]  # fmt: skip
    assert [run.entities["dir"] for run in iu.dwi] == ["AP", "PA"]
    for s in sessions:
        for run in s.dwi:
            assert run.bval is not None and run.bvec is not None and run.sidecar is not None
    assert by_subject["IXI012"].dwi == () and len(by_subject["IXI012"].t1w) == 1
    # rec-norm has no sidecar of its own, and the rec-nonorm one does not apply to it
    assert load_metadata(iu.t1w[1], REALBIDS) == {}
    assert load_metadata(iu.t1w[0], REALBIDS)["Manufacturer"] == "Siemens"
    norm = collect_inputs(REALBIDS, participant_labels=["IU01"], bids_filters={"t1w": {"reconstruction": "norm"}},
                          modalities=("T1w",))  # fmt: skip
    assert _names(norm[0].t1w) == ["sub-IU01_ses-siemensprismafitxa30_rec-norm_T1w.nii.gz"]
    dwi_only = collect_inputs(REALBIDS, modalities=("dwi",))
    assert "IXI012" not in {s.subject for s in dwi_only} and len(dwi_only) == 5
