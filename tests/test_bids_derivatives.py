from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ihf_bids.bids import (
    BIDSIGNORE_PATTERNS,
    bids_uri,
    derivative_path,
    find_validator,
    parse_entities,
    validate_dataset,
    write_bidsignore,
    write_citation,
    write_dataset_description,
    write_sidecar,
)
from ihf_bids.errors import InputDataError
from ihf_bids.templates import TEMPLATE_SPACE

needs_validator = pytest.mark.skipif(find_validator() is None, reason="bids-validator-deno is not installed")

T1W = "/data/sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz"
DWI = "/data/sub-01/ses-A/dwi/sub-01_ses-A_dir-AP_dwi.nii.gz"


# --------------------------------------------------------------------------- #
# names
# --------------------------------------------------------------------------- #
def test_names_the_app_writes():
    out = Path("/out")

    def rel(path: Path) -> str:
        return path.relative_to(out).as_posix()

    anat = "sub-01/ses-A/anat/sub-01_ses-A_"
    assert rel(derivative_path(out, T1W, space=TEMPLATE_SPACE, desc="preproc")) == (
        anat + "space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz")  # fmt: skip
    assert rel(derivative_path(out, T1W, space=TEMPLATE_SPACE, desc="harmonized")) == (
        anat + "space-MNI152NLin2009aSym_desc-harmonized_T1w.nii.gz")  # fmt: skip
    assert rel(derivative_path(out, T1W, space=TEMPLATE_SPACE, desc="brain", suffix="mask")) == (
        anat + "space-MNI152NLin2009aSym_desc-brain_mask.nii.gz")  # fmt: skip
    xfm = {"from_": "T1w", "to": TEMPLATE_SPACE, "mode": "image", "suffix": "xfm"}
    assert rel(derivative_path(out, T1W, **xfm, extension=".mat")) == (
        anat + "from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat")  # fmt: skip
    assert rel(derivative_path(out, T1W, **xfm)) == anat + "from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.nii.gz"
    dwi = derivative_path(out, DWI, space=TEMPLATE_SPACE, res=2, desc="preproc")
    assert rel(dwi) == "sub-01/ses-A/dwi/sub-01_ses-A_dir-AP_space-MNI152NLin2009aSym_res-2_desc-preproc_dwi.nii.gz"
    for ext in (".bval", ".bvec", ".json", "json"):
        assert derivative_path(out, dwi, extension=ext).name == dwi.name.replace(".nii.gz", "." + ext.lstrip("."))
    fa = derivative_path(out, dwi, model="tensor", param="fa", suffix="dwimap")
    assert (
        fa.name == "sub-01_ses-A_dir-AP_space-MNI152NLin2009aSym_res-2_model-tensor_param-fa_desc-preproc_dwimap.nii.gz"
    )
    harmonized = derivative_path(out, fa, desc="harmonized")
    assert harmonized.name == fa.name.replace("desc-preproc", "desc-harmonized") and harmonized.parent == fa.parent
    # the names every writer uses all parse back to their entities
    assert parse_entities(fa) == {"sub": "01", "ses": "A", "dir": "AP", "space": TEMPLATE_SPACE, "res": "2",
                                  "model": "tensor", "param": "fa", "desc": "preproc", "suffix": "dwimap",
                                  "extension": ".nii.gz", "datatype": "dwi"}  # fmt: skip


def test_entity_order_sources_and_overrides():
    src = "sub-01_ses-A_acq-hi_ce-gd_rec-norm_dir-PA_run-2_T1w.nii"
    name = derivative_path("o", src, desc="preproc", space="T1w", res=1, label="GM", suffix="probseg").name
    assert (
        name == "sub-01_ses-A_acq-hi_ce-gd_rec-norm_dir-PA_run-2_space-T1w_res-1_label-GM_desc-preproc_probseg.nii.gz"
    )
    # entities given as a mapping, with pybids or short names; no session
    entities = {"subject": "02", "reconstruction": "nonorm", "run": 1, "suffix": "T1w", "datatype": "anat"}
    assert (
        derivative_path("o", entities, desc="preproc").as_posix()
        == "o/sub-02/anat/sub-02_rec-nonorm_run-1_desc-preproc_T1w.nii.gz"
    )
    # None keeps, "" drops
    preproc = derivative_path("o", T1W, space=TEMPLATE_SPACE, desc="preproc")
    assert derivative_path("o", preproc, desc="").name == "sub-01_ses-A_space-MNI152NLin2009aSym_T1w.nii.gz"
    assert derivative_path("o", preproc, extension=None).name == preproc.name
    assert (
        derivative_path("o", preproc, res=2.0).name
        == "sub-01_ses-A_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz"
    )
    assert derivative_path("o", "sub-01_dwi.nii.gz", desc="brain", suffix="mask").parent.name == "dwi"
    assert derivative_path("o", {"sub": "01"}, suffix="mask", datatype="dwi").parent.as_posix() == "o/sub-01/dwi"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"desc": "pre-proc"}, "letters and digits"),
        ({"res": 1.5}, "letters and digits"),
        ({"label": "GM_WM"}, "letters and digits"),
        ({"suffix": "T1w.nii"}, "suffix"),
    ],
)
def test_invalid_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        derivative_path("o", T1W, **kwargs)


def test_invalid_sources():
    with pytest.raises(ValueError, match="subject"):
        derivative_path("o", {"session": "A", "suffix": "T1w"})
    with pytest.raises(ValueError, match="unknown BIDS entities"):
        derivative_path("o", {"sub": "01", "flavour": "x", "suffix": "T1w"})
    with pytest.raises(ValueError, match="datatype"):
        derivative_path("o", {"sub": "01"}, suffix="mask")
    with pytest.raises(ValueError, match="not a BIDS file name"):
        derivative_path("o", "T1w.nii.gz")


def test_bids_uri(tmp_path):
    raw = tmp_path / "bids"
    out = raw / "derivatives" / "ihf-bids"
    t1w = raw / "sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz"
    assert bids_uri(t1w, raw) == "bids:raw:sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz"
    assert bids_uri(t1w, raw, output_dir=out) == "bids:raw:sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz"
    mask = out / "sub-01/ses-A/anat/sub-01_ses-A_desc-brain_mask.nii.gz"
    assert bids_uri(mask, raw, output_dir=out) == "bids::sub-01/ses-A/anat/sub-01_ses-A_desc-brain_mask.nii.gz"
    (tmp_path / "link").symlink_to(raw, target_is_directory=True)
    assert bids_uri(tmp_path / "link" / "sub-01" / "x.nii.gz", raw) == "bids:raw:sub-01/x.nii.gz"
    with pytest.raises(ValueError, match="not inside"):
        bids_uri(tmp_path / "elsewhere.nii.gz", raw, output_dir=out)


# --------------------------------------------------------------------------- #
# writers
# --------------------------------------------------------------------------- #
def test_write_sidecar(tmp_path):
    image = tmp_path / "sub-01" / "anat" / "sub-01_desc-preproc_T1w.nii.gz"
    path = write_sidecar(image, {"b": np.float32(1.5), "a": [np.int64(1), 2], "Sources": [Path("x")]})
    assert path == image.with_name("sub-01_desc-preproc_T1w.json")
    text = path.read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1.5, "Sources": ["x"]}
    assert text.index('"Sources"') < text.index('"a"') < text.index('"b"') and text.endswith("\n")
    inode, mtime = path.stat().st_ino, path.stat().st_mtime_ns
    write_sidecar(path, {"Sources": ["x"], "a": [1, 2], "b": 1.5})  # same content: not rewritten
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime)
    write_sidecar(path, {"a": 3})
    assert json.loads(path.read_text()) == {"a": 3}
    with pytest.raises(ValueError):
        write_sidecar(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 3}  # a failed write leaves the old file
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left


def test_dataset_description(tmp_path, monkeypatch):
    monkeypatch.delenv("IHF_BIDS_CONTAINER_TYPE", raising=False)
    monkeypatch.delenv("IHF_BIDS_CONTAINER_TAG", raising=False)
    raw = tmp_path / "bids"
    out = tmp_path / "out"
    path = write_dataset_description(out, bids_dir=raw, version="1.2.3")
    desc = json.loads(path.read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"] and desc["Name"]
    assert desc["GeneratedBy"] == [
        {"Name": "ihf-bids", "Version": "1.2.3", "CodeURL": desc["GeneratedBy"][0]["CodeURL"]}
    ]
    assert desc["GeneratedBy"][0]["CodeURL"].startswith("https://")
    assert desc["SourceDatasets"] == [{"URL": raw.as_uri()}] and desc["DatasetLinks"] == {"raw": raw.as_uri()}
    monkeypatch.setenv("IHF_BIDS_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("IHF_BIDS_CONTAINER_TAG", "ihfbids/ihf-bids:1.2.3")
    desc = json.loads(write_dataset_description(out, bids_dir=raw, version="1.2.3").read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "ihfbids/ihf-bids:1.2.3"}
    desc = json.loads(
        write_dataset_description(out, bids_dir=raw, version="1", container={"Type": "singularity"}).read_text()
    )
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "singularity"}


def test_bidsignore_and_citation(tmp_path):
    path = write_bidsignore(tmp_path)
    assert path.read_text().splitlines() == list(BIDSIGNORE_PATTERNS)
    path.write_text("mine/\n*.html\n")
    write_bidsignore(tmp_path)
    lines = path.read_text().splitlines()
    assert lines[0] == "mine/" and set(BIDSIGNORE_PATTERNS) <= set(lines) and lines.count("*.html") == 1
    mtime = path.stat().st_mtime_ns
    write_bidsignore(tmp_path)
    assert path.stat().st_mtime_ns == mtime
    citation = write_citation(tmp_path, "# Methods\nWe used ihf-bids.")
    assert citation == tmp_path / "logs" / "CITATION.md"
    assert citation.read_text() == "# Methods\nWe used ihf-bids.\n"


_WRITER = """
import sys, time
from pathlib import Path
from ihf_bids.bids import write_bidsignore, write_citation, write_dataset_description
out, go, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
while not go.exists():
    time.sleep(0.002)
for i in range(40):
    # two versions alternate, so that files are really replaced while others read and write them
    version = str(1 + (k + i) % 2)
    for step in (k + i) % 3, (k + i + 1) % 3, (k + i + 2) % 3:
        if step == 0:
            write_dataset_description(out, bids_dir="/data/bids", version=version)
        elif step == 1:
            write_bidsignore(out)
        else:
            write_citation(out, "# Citation " + version + "\\n\\n" + version * 20000)
"""


def _citation(version: str) -> str:
    return "# Citation " + version + "\n\n" + version * 20000 + "\n"


def test_concurrent_writers_leave_valid_files(tmp_path):
    out, go = tmp_path / "shared_out", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("IHF_BIDS_CONTAINER_TYPE", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(out), str(go), str(k)], env=env, stderr=subprocess.PIPE, text=True
        )
        for k in range(8)
    ]
    time.sleep(1.0)
    go.touch()
    reads = 0
    while any(proc.poll() is None for proc in procs):  # readers never see a partial file
        for name, check in (
            ("dataset_description.json", lambda text: json.loads(text)["GeneratedBy"][0]["Version"] in ("1", "2")),
            ("logs/CITATION.md", lambda text: text in (_citation("1"), _citation("2"))),
        ):
            try:
                text = (out / name).read_text()
            except FileNotFoundError:
                continue
            assert check(text), text[:200]
            reads += 1
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Version"] in ("1", "2")
    assert (out / ".bidsignore").read_text().splitlines() == list(BIDSIGNORE_PATTERNS)
    assert (out / "logs" / "CITATION.md").read_text() in (_citation("1"), _citation("2"))
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    assert reads > 0


# --------------------------------------------------------------------------- #
# the validator on a derivative tree written with these functions
# --------------------------------------------------------------------------- #
def _nifti(path: Path, shape=(5, 6, 4), dtype=np.float32) -> Path:
    import nibabel as nib

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -5
    img = nib.Nifti1Image(np.zeros(shape, dtype=dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _derivative_tree(raw: Path, out: Path) -> Path:
    t1w = raw / "sub-01/ses-A/anat/sub-01_ses-A_rec-norm_T1w.nii.gz"
    dwi = raw / "sub-01/ses-A/dwi/sub-01_ses-A_dir-AP_dwi.nii.gz"
    write_dataset_description(out, bids_dir=raw, version="0.1.0")
    write_bidsignore(out)
    write_citation(out, "# Methods\n")

    def uri(path):
        return bids_uri(path, raw, output_dir=out)

    preproc = _nifti(derivative_path(out, t1w, space=TEMPLATE_SPACE, desc="preproc"))
    write_sidecar(preproc, {"Sources": [uri(t1w)], "SkullStripped": True})
    harmonized = _nifti(derivative_path(out, t1w, space=TEMPLATE_SPACE, desc="harmonized"))
    write_sidecar(harmonized, {"Sources": [uri(preproc)], "SkullStripped": True})
    mask = _nifti(derivative_path(out, t1w, space=TEMPLATE_SPACE, desc="brain", suffix="mask"), dtype=np.uint8)
    write_sidecar(mask, {"Sources": [uri(t1w)], "Type": "Brain"})
    xfm = derivative_path(out, t1w, from_="T1w", to=TEMPLATE_SPACE, mode="image", suffix="xfm", extension=".mat")
    xfm.write_bytes(b"\x00" * 16)
    _nifti(derivative_path(out, t1w, from_="T1w", to=TEMPLATE_SPACE, mode="image", suffix="xfm"), (5, 6, 4, 1, 3))
    _nifti(derivative_path(out, t1w, from_=TEMPLATE_SPACE, to="T1w", mode="image", suffix="xfm"), (5, 6, 4, 1, 3))

    dwi_out = _nifti(derivative_path(out, dwi, space=TEMPLATE_SPACE, res=2, desc="preproc"), (5, 6, 4, 3))
    derivative_path(out, dwi_out, extension=".bval").write_text("0 1000 1000\n")
    derivative_path(out, dwi_out, extension=".bvec").write_text("0 1 0\n0 0 1\n0 0 0\n")
    resolution = "2 mm isotropic grid of the MNI152NLin2009aSym template"
    write_sidecar(dwi_out, {"Sources": [uri(dwi)], "SkullStripped": True, "Resolution": resolution,
                            "RepetitionTime": 8.0})  # fmt: skip
    fa = _nifti(derivative_path(out, dwi_out, model="tensor", param="fa", suffix="dwimap"))
    write_sidecar(fa, {"Sources": [uri(dwi_out)], "SkullStripped": True, "Resolution": resolution})
    fa_h = _nifti(derivative_path(out, fa, desc="harmonized"))
    write_sidecar(fa_h, {"Sources": [uri(fa)], "SkullStripped": True, "Resolution": resolution})
    # reports and crash files where NiPreps put them
    (out / "sub-01.html").write_text("<html></html>\n")
    (out / "sub-01" / "figures").mkdir()
    (out / "sub-01" / "figures" / "sub-01_ses-A_desc-harmonized_T1w.svg").write_text("<svg/>\n")
    (out / "sub-01" / "log" / "20240101-000000").mkdir(parents=True)
    (out / "sub-01" / "log" / "20240101-000000" / "crash-x.txt").write_text("crash\n")
    return out


@needs_validator
def test_derivative_tree_passes_the_validator(tmp_path):
    out = _derivative_tree(tmp_path / "bids", tmp_path / "bids" / "derivatives" / "ihf-bids")
    report = validate_dataset(out, derivative=True)
    assert report.ok, report.format_errors(20)
    assert report.summary["subjects"] == ["01"]

    # Without .bidsignore, the errors are exactly the files its patterns cover (so each is needed).
    (out / ".bidsignore").unlink()
    report = validate_dataset(out, derivative=True)
    assert not report.ok
    flagged = {issue.location.strip("/") for issue in report.errors}

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        return any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in BIDSIGNORE_PATTERNS)

    assert all(ignored(rel) for rel in flagged), flagged
    needed = {pattern for pattern in BIDSIGNORE_PATTERNS for rel in flagged
              if any(fnmatch.fnmatch(part, pattern) for part in rel.split("/"))}  # fmt: skip
    # The top-level logs/ is tolerated anyway; models/, group_* and group/ are written by the group level.
    assert needed >= set(BIDSIGNORE_PATTERNS) - {"logs", "models", "group_*", "group"}, needed


@needs_validator
def test_validator_catches_missing_metadata(tmp_path):
    out = _derivative_tree(tmp_path / "bids", tmp_path / "out")
    preproc = next(out.rglob("*_desc-preproc_T1w.json"))
    write_sidecar(preproc, {"Sources": ["bids:raw:sub-01/ses-A/anat/sub-01_ses-A_rec-norm_T1w.nii.gz"]})
    report = validate_dataset(out, derivative=True)  # returned, not raised, for our own outputs
    assert any(i.code == "SIDECAR_KEY_REQUIRED" and "SkullStripped" in i.message for i in report.errors)


@needs_validator
def test_input_validation_raises_with_hint(tmp_path):
    from ihf_bids.phantom import generate_phantom

    ds = generate_phantom(tmp_path / "bids", n_subjects=2, n_sites=1, size="tiny", seed=0, modalities=("T1w",))
    assert validate_dataset(ds.root).ok
    (ds.root / "sub-02" / "notes.txt").write_text("x")
    with pytest.raises(InputDataError) as err:
        validate_dataset(ds.root)
    assert "--skip-bids-validation" in str(err.value) and "/sub-02/notes.txt" in str(err.value)
    # problems in a subject that was not selected do not count
    assert validate_dataset(ds.root, participant_labels=["01"]).ok
    assert not validate_dataset(ds.root, raise_on_error=False).ok


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Temporary files are private (0600); the renamed output must be 0666 less the umask."""
    import os

    from ihf_bids.harmonize.checkpoint import write_bytes_atomically

    old = os.umask(0o027)
    try:
        path = tmp_path / "dataset_description.json"
        write_bytes_atomically(path, lambda handle: handle.write(b"{}"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
