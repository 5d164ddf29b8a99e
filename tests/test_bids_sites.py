from __future__ import annotations

import json
from pathlib import Path

import pytest

from ihf_bids.bids import SessionInputs, collect_inputs, find_sites, sanitize_label
from ihf_bids.errors import InputDataError, UsageError

REALBIDS = Path("/work/shared/data/realbids")
needs_realbids = pytest.mark.skipif(not REALBIDS.is_dir(), reason=f"real dataset not available at {REALBIDS}")


def make_dataset(root: Path, files: dict[str, str | dict | None]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content) if isinstance(content, dict) else (content or ""))
    return root


# --------------------------------------------------------------------------- #
# the phantom: every subject travels to every site
# --------------------------------------------------------------------------- #
def test_phantom_sessions_column_wins_over_home_site(tiny_phantom):
    root = tiny_phantom.root
    sessions = collect_inputs(root)
    auto = find_sites(root, sessions)
    assert auto == {s.key: s.session for s in sessions}  # sessions.tsv: site of each session
    assert find_sites(root, sessions, source="sessions") == auto
    home = find_sites(root, sessions, source="participants")
    assert {home[s.key] for s in sessions if s.subject == "02"} == {"ge"}  # one home site per subject
    assert home != auto


def test_phantom_sidecar_source(tiny_phantom):
    root = tiny_phantom.root
    sessions = collect_inputs(root)
    sites = find_sites(root, sessions, source="sidecar")
    by_session = {}
    for s in sessions:
        by_session.setdefault(s.session, set()).add(sites[s.key])
    assert all(len(labels) == 1 for labels in by_session.values())  # same scanner, same label for every subject
    assert by_session["ge"] == {"GEDISCOVERYMR750"}
    assert all(label.isalnum() and label.isascii() for label in sites.values())
    manufacturer = find_sites(root, sessions, source="sidecar", sidecar_fields=("Manufacturer",))
    assert {manufacturer[s.key] for s in sessions} == {"Siemens", "GE", "Philips"}
    # stable: a subset of sessions, in another order, gets the same labels
    subset = list(reversed(sessions[:4]))
    assert find_sites(root, subset, source="sidecar") == {s.key: sites[s.key] for s in subset}


# --------------------------------------------------------------------------- #
# fallbacks and errors on synthetic datasets
# --------------------------------------------------------------------------- #
def test_auto_falls_back_per_session(tmp_path):
    root = make_dataset(tmp_path / "ds", {
        "participants.tsv": "participant_id\tsite\nsub-01\tHome Site\nsub-02\tn/a\n",
        "sub-01/sub-01_sessions.tsv": "session_id\tsite\nses-A\tScanner A\nses-B\tn/a\n",
        "sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz": None,
        "sub-01/ses-B/anat/sub-01_ses-B_T1w.nii.gz": None,
        "sub-02/ses-A/anat/sub-02_ses-A_T1w.nii.gz": None,
        "sub-02/ses-A/anat/sub-02_ses-A_T1w.json": {"Manufacturer": "GE", "ManufacturersModelName": "SIGNA Premier"},
    })  # fmt: skip
    sessions = collect_inputs(root)
    assert find_sites(root, sessions) == {
        ("01", "A"): "ScannerA",  # sessions.tsv
        ("01", "B"): "HomeSite",  # n/a there: participants.tsv
        ("02", "A"): "GESIGNAPremier",  # no value anywhere: sidecar
    }
    with pytest.raises(InputDataError) as err:
        find_sites(root, sessions, source="sessions")
    message = str(err.value)
    assert "sub-01_ses-B" in message and "sub-01_sessions.tsv" in message and "--site-source" in message
    with pytest.raises(InputDataError, match="participants.tsv has no 'site' value for sub-02"):
        find_sites(root, sessions, source="participants")
    with pytest.raises(InputDataError, match="column 'scanner'"):
        find_sites(root, sessions, source="sessions", column="scanner")


def test_undeterminable_site_names_session_and_options(tmp_path):
    root = make_dataset(tmp_path / "ds", {
        "sub-01/anat/sub-01_T1w.nii.gz": None,
        "sub-01/anat/sub-01_T1w.json": {"Manufacturer": "Siemens"},
    })  # fmt: skip
    sessions = collect_inputs(root)
    assert sessions[0].session is None
    with pytest.raises(InputDataError) as err:
        find_sites(root, sessions)
    message = str(err.value)
    for needle in ("sub-01", "ManufacturersModelName", "--site-source", "--site-column", "--site-sidecar-fields"):
        assert needle in message
    assert find_sites(root, sessions, sidecar_fields=["Manufacturer"]) == {("01", None): "Siemens"}
    with pytest.raises(InputDataError, match="no sessions"):
        find_sites(root, sessions, source="sessions", sidecar_fields=["Manufacturer"])


def test_conflicting_sidecars_name_the_files(tmp_path):
    root = make_dataset(tmp_path / "ds", {
        "sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz": None,
        "sub-01/ses-A/anat/sub-01_ses-A_T1w.json": {"Manufacturer": "Siemens", "ManufacturersModelName": "Prisma"},
        "sub-01/ses-A/dwi/sub-01_ses-A_dwi.nii.gz": None,
        "sub-01/ses-A/dwi/sub-01_ses-A_dwi.json": {"Manufacturer": "GE", "ManufacturersModelName": "Prisma"},
    })  # fmt: skip
    sessions = collect_inputs(root)
    with pytest.raises(InputDataError) as err:
        find_sites(root, sessions, source="sidecar")
    message = str(err.value)
    assert "sub-01_ses-A_T1w.nii.gz" in message and "sub-01_ses-A_dwi.nii.gz" in message and "Manufacturer" in message
    # the same scanner written with other case or spacing is not a conflict, and the label does not depend on order
    (root / "sub-01/ses-A/dwi/sub-01_ses-A_dwi.json").write_text(
        json.dumps({"Manufacturer": "SIEMENS", "ManufacturersModelName": "prisma "}))  # fmt: skip
    assert find_sites(root, sessions, source="sidecar") == {("01", "A"): "SIEMENSPrisma"}


def test_sidecar_inheritance_and_bad_options(tmp_path):
    root = make_dataset(tmp_path / "ds", {
        "dwi.json": {"Manufacturer": "Philips", "ManufacturersModelName": "Ingenia Elition X"},
        "sub-01/dwi/sub-01_dwi.nii.gz": None,
    })  # fmt: skip
    sessions = collect_inputs(root)
    assert find_sites(root, sessions, source="sidecar") == {("01", None): "PhilipsIngeniaElitionX"}
    with pytest.raises(UsageError, match="--site-source 'scanner'"):
        find_sites(root, sessions, source="scanner")
    with pytest.raises(UsageError, match="--site-sidecar-fields"):
        find_sites(root, sessions, sidecar_fields=())
    assert find_sites(root, [], source="sidecar") == {}
    assert find_sites(root, [SessionInputs("01", None, dwi=sessions[0].dwi)], sidecar_fields="Manufacturer") == {
        ("01", None): "Philips"}  # fmt: skip


def test_sanitize_label():
    assert sanitize_label("Philips Ingenia Elition X") == "PhilipsIngeniaElitionX"
    assert sanitize_label("Galan 3T (V6.1)") == "Galan3TV61"
    assert sanitize_label("Ø-_ /") == ""
    assert sanitize_label(3) == "3"


# --------------------------------------------------------------------------- #
# the real dataset: one subject per scanner
# --------------------------------------------------------------------------- #
@needs_realbids
def test_realbids_participants_column():
    sessions = collect_inputs(REALBIDS)
    sites = find_sites(REALBIDS, sessions, source="participants")
    assert len(sites) == 6 and len(set(sites.values())) == 6
    assert sites[("IXI012", "HH")] == "HH"
    assert find_sites(REALBIDS, sessions) == sites  # auto: no sessions.tsv, so participants.tsv


@needs_realbids
def test_realbids_sidecar_vendor_and_model():
    sessions = collect_inputs(REALBIDS, modalities=("dwi",))
    sites = find_sites(REALBIDS, sessions, source="sidecar")
    assert sites == {
        ("GHUPARIS01", "canongalan3tv61"): "CanonGalan3T",
        ("IU01", "siemensprismafitxa30"): "SiemensMAGNETOMPrismaFit",
        ("PHBLR01", "philipsachievablr"): "PhilipsAchieva",
        ("PHGANJI01", "philipsingeniaelitionx"): "PhilipsIngeniaElitionX",
        ("PHNOTT01", "philipsingeniaelitionxnottingham"): "PhilipsIngeniaElitionX",
    }
    # InstitutionName tells the two Ingenia Elition X scanners apart (PHGANJI01 has none: error)
    with pytest.raises(InputDataError, match="sub-PHGANJI01.*InstitutionName"):
        find_sites(REALBIDS, sessions, source="sidecar", sidecar_fields=("ManufacturersModelName", "InstitutionName"))
    # T1w without sidecar (IXI): the sidecar source cannot tell its site
    with pytest.raises(InputDataError, match="sub-IXI012_ses-HH"):
        find_sites(REALBIDS, collect_inputs(REALBIDS), source="sidecar")
