"""Reliability battery, bad input: every defect gives a clear error, a documented exit code,
leaves the input dataset untouched and writes no half-finished outputs.

Each case runs the real command line (:func:`ihf_bids.cli.run.main`) on a copy of one tiny
traveling phantom (1 participant x 2 sites, 4 mm) with exactly one defect, and checks

(a) the exit code documented in :mod:`ihf_bids.errors` (2 usage, 65 input data, 70 the
    workflow cannot be built);
(b) that the logged message names the offending file (or option) and says what to do;
(c) that nothing inside BIDS_DIR changed (paths, sizes and modification times);
(d) that nothing was written to OUTPUT_DIR: a participant run refused by its pre-flight
    does not even create it, and a refused group run adds at most ``.bidsignore`` and
    its ``logs/config-*.json``; no ``*.tmp`` file is left anywhere.

Model cases use a model directory written with :func:`~ihf_bids.harmonize.checkpoint.save_model`
(a tiny network, fake target profiles): training through the app would take minutes.
Three behaviours are checked with real runs: non-RAS and oblique T1w images are conformed
and their original orientation recorded in the sidecar; a DWI shell the target site lacks
leaves the run preprocessed but not harmonized (``HarmonizationSkipped``); ``--device cuda``
without a GPU is refused at start-up (in a subprocess that hides every GPU).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ihf_bids.cli.run import main
from ihf_bids.errors import EXIT_DATA_ERROR, EXIT_USAGE, EXIT_WORKFLOW_BUILD

COMMON = ["--anat-resolution", "4", "--dwi-resolution", "4", "--nprocs", "2", "--omp-nthreads", "1"]
SKIP = "--skip-bids-validation"
SPACE = "space-MNI152NLin2009aSym"

T1W_GE = "sub-01/ses-ge/anat/sub-01_ses-ge_T1w.nii.gz"
T2W_GE = "sub-01/ses-ge/anat/sub-01_ses-ge_T2w.nii.gz"
T1W_SIEMENS = "sub-01/ses-siemens/anat/sub-01_ses-siemens_T1w.nii.gz"
DWI_GE = "sub-01/ses-ge/dwi/sub-01_ses-ge_dwi"  # + .nii.gz, .bval, .bvec
DWI_SIEMENS = "sub-01/ses-siemens/dwi/sub-01_ses-siemens_dwi"
#: a small network (as in tests/test_training.py)
SMALL_ARCH = {"in_channels": 3, "levels": [{"components": 2, "hidden": 8}, {"components": 2, "hidden": 16}],
              "embedding_hidden": 32, "alpha_init": 0.5}
#: the shells of each phantom site (the GE site has no b=2000)
SITE_SHELLS = {"siemens": ("b0", "b1000", "b2000"), "ge": ("b0", "b1000")}


# --------------------------------------------------------------------------- #
# fixtures: one clean phantom and one model per module
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def clean_phantom(tmp_path_factory) -> Path:
    """The defect-free dataset; every case works on its own copy."""
    from ihf_bids.phantom import generate_phantom

    root = tmp_path_factory.mktemp("inputs_phantom") / "bids"
    generate_phantom(root, n_subjects=1, n_sites=2, size="tiny", seed=1)
    return root


def _write_model(root: Path) -> Path:
    """A model directory as ``group --train`` lays it out: ``<root>/{anat,dwi}/{model.pt, model.json, profiles/}``."""
    from ihf_bids.harmonize.checkpoint import save_model
    from ihf_bids.harmonize.profile import TargetProfile, profile_filename
    from ihf_bids.model.flow import FlowConfig, IHFHarmony

    groups = {"anat": {site: ("T1w", "T2w") for site in SITE_SHELLS},
              "dwi": {site: tuple(f"dwi-{s}" for s in shells) for site, shells in SITE_SHELLS.items()}}
    for group, by_site in groups.items():
        modalities = sorted({m for mods in by_site.values() for m in mods})
        for site, mods in by_site.items():  # profiles first: model.pt records their digests, as in training
            for modality in mods:
                TargetProfile(site=site, modality=modality, embeddings=np.zeros((12, 1920), np.float32),
                              intensity_scale=1000.0, n_volumes=1).save(
                    root / group / "profiles" / profile_filename(site, modality))
        save_model(IHFHarmony(FlowConfig.from_dict(SMALL_ARCH)), root / group,
                   {"group": group, "modalities": modalities, "sites": sorted(by_site), "template": SPACE[6:]})
    return root


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory) -> Path:
    """A valid model (tiny network, fake profiles of both phantom sites), outside any OUTPUT_DIR."""
    return _write_model(tmp_path_factory.mktemp("inputs_model") / "ihf-harmony")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Ctx:
    """Paths of one case."""

    bids: Path
    out: Path
    work: Path
    tmp: Path
    model: Path

    def fmt(self, text: str) -> str:
        """``text`` with the case's paths filled in."""
        return text.format(bids=self.bids, out=self.out, work=self.work, tmp=self.tmp, model=self.model)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``root`` and every path under it with its size and modification time."""
    return {p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in (root, *root.rglob("*"))}


def run_cli(argv: list[str]) -> int:
    """``main(argv)``; argparse's own errors (SystemExit) give their exit code too."""
    try:
        return main(argv)
    except SystemExit as exc:  # argparse: exit 2 with its message on stderr
        return int(exc.code)


def rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None,
            qform_code: int = 1, sform_code: int = 1, qform: np.ndarray | None = None) -> None:
    """Write ``path`` again as float32 with new data, affine or header codes."""
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32) if data is None else np.asarray(data, dtype=np.float32)
    affine = img.affine if affine is None else affine
    new = nib.Nifti1Image(data, affine)
    new.set_qform(affine if qform is None else qform, code=qform_code)
    new.set_sform(affine, code=sform_code)
    nib.save(new, path)


def edit_data(relpath: str, edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[Ctx], None]:
    """A defect: the image ``relpath`` rewritten (float32) with ``edit(data)``."""
    def corrupt(ctx: Ctx) -> None:
        path = ctx.bids / relpath
        rewrite(path, edit(np.asarray(nib.load(path).dataobj, dtype=np.float32)))
    return corrupt


def with_nan(data: np.ndarray) -> np.ndarray:
    """One NaN voxel."""
    data = data.copy()
    data[10, 10, 10] = np.nan
    return data


def with_inf(data: np.ndarray) -> np.ndarray:
    """One infinite voxel (in a 4-D run)."""
    data = data.copy()
    data[10, 10, 10, 3] = np.inf
    return data


def four_d(data: np.ndarray) -> np.ndarray:
    """Three copies of a 3-D image as a 4-D series."""
    return np.stack([data, data, data], axis=-1)


def edit_text(relpath: str, edit: Callable[[str], str]) -> Callable[[Ctx], None]:
    """A defect: the text file ``relpath`` rewritten with ``edit(text)``."""
    def corrupt(ctx: Ctx) -> None:
        path = ctx.bids / relpath
        path.write_text(edit(path.read_text()))
    return corrupt


def remove(relpath: str) -> Callable[[Ctx], None]:
    """A defect: ``relpath`` deleted."""
    return lambda ctx: (ctx.bids / relpath).unlink()


def bvec_column(index: int, scale: float) -> Callable[[str], str]:
    """Multiply the b-vector of volume ``index`` by ``scale``."""
    def edit(text: str) -> str:
        rows = [line.split() for line in text.splitlines() if line.strip()]
        for row in rows:
            row[index] = f"{float(row[index]) * scale:.6f}"
        return "\n".join(" ".join(row) for row in rows) + "\n"
    return edit


def drop_last(text: str) -> str:
    """The last value of every row removed."""
    return "\n".join(" ".join(line.split()[:-1]) for line in text.splitlines() if line.strip()) + "\n"


def no_b0(text: str) -> str:
    """Every b=0 entry turned into b=1000."""
    return " ".join("1000" if float(v) <= 50 else v for v in text.split()) + "\n"


def one_direction(text: str) -> str:
    """Every b-vector set to (1, 0, 0): the run keeps its volumes but has a single direction."""
    n = len(text.splitlines()[0].split())
    return "\n".join(" ".join([value] * n) for value in ("1", "0", "0")) + "\n"


def truncate_gzip(relpath: str) -> Callable[[Ctx], None]:
    """A defect: the image cut in half inside a valid gzip stream."""
    def corrupt(ctx: Ctx) -> None:
        path = ctx.bids / relpath
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return corrupt


def garbage(relpath: str) -> Callable[[Ctx], None]:
    """A defect: the image replaced by bytes that are not a NIfTI file."""
    return lambda ctx: (ctx.bids / relpath).write_bytes(b"\x1f\x8b not really gzip" * 50)


def header_codes_zero(ctx: Ctx) -> None:
    """A defect: qform and sform codes both 0 (orientation unknown)."""
    rewrite(ctx.bids / T1W_GE, qform_code=0, sform_code=0)


def forms_disagree(ctx: Ctx) -> None:
    """A defect: qform (code 1) 8 mm away from the sform (code 2)."""
    path = ctx.bids / T1W_GE
    qform = nib.load(path).affine.copy()
    qform[:3, 3] += [8.0, 0.0, 0.0]
    rewrite(path, qform=qform, qform_code=1, sform_code=2)


def voxel_size(relpath: str, size: float) -> Callable[[Ctx], None]:
    """A defect: isotropic voxels of ``size`` mm in the header."""
    def corrupt(ctx: Ctx) -> None:
        path = ctx.bids / relpath
        affine = nib.load(path).affine.copy()
        affine[:3, :3] = np.diag([size, size, size])
        rewrite(path, affine=affine)
    return corrupt


def no_sites(ctx: Ctx) -> None:
    """No site column in sessions.tsv or participants.tsv, no Manufacturer in any sidecar."""
    for table in (ctx.bids / "participants.tsv", ctx.bids / "sub-01" / "sub-01_sessions.tsv"):
        rows = [line.split("\t") for line in table.read_text().splitlines()]
        keep = [i for i, name in enumerate(rows[0]) if name != "site"]
        table.write_text("\n".join("\t".join(row[i] for i in keep) for row in rows) + "\n")
    for sidecar in ctx.bids.glob("sub-01/ses-*/*/*.json"):
        meta = json.loads(sidecar.read_text())
        meta.pop("Manufacturer", None)
        sidecar.write_text(json.dumps(meta, indent=2))


def sidecars_disagree(ctx: Ctx) -> None:
    """A defect: the T1w of ses-ge says Philips, its other images GE."""
    sidecar = ctx.bids / T1W_GE.replace(".nii.gz", ".json")
    meta = json.loads(sidecar.read_text())
    meta["Manufacturer"] = "Philips"
    sidecar.write_text(json.dumps(meta, indent=2))


def all_zero_reference(ctx: Ctx) -> None:
    """An all-zero image to pass with --target-reference (outside the dataset)."""
    img = nib.load(ctx.bids / T1W_GE)
    ref = nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine)
    nib.save(ref, ctx.tmp / "reference_T1w.nii.gz")


def read_only_parent(ctx: Ctx) -> None:
    """A folder no one may write into, to hold OUTPUT_DIR."""
    (ctx.tmp / "locked").mkdir()
    (ctx.tmp / "locked").chmod(0o555)


# --------------------------------------------------------------------------- #
# model defects
# --------------------------------------------------------------------------- #
def _reseal(group_dir: Path) -> None:
    """Record the current model.pt's sha256 in model.json (so that the next check is the one that fails)."""
    from ihf_bids.harmonize.checkpoint import sha256sum

    meta = json.loads((group_dir / "model.json").read_text())
    meta["sha256"] = sha256sum(group_dir / "model.pt")
    (group_dir / "model.json").write_text(json.dumps(meta, indent=2))


def _edit_payload(ctx: Ctx, edit: Callable[[dict], None]) -> None:
    """Rewrite the anat checkpoint's payload with ``edit`` and record its new sha256."""
    import torch

    path = ctx.model / "anat" / "model.pt"
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    _reseal(ctx.model / "anat")


def flip_byte(ctx: Ctx) -> None:
    """A defect: one byte of the checkpoint flipped (its recorded sha256 no longer fits)."""
    path = ctx.model / "anat" / "model.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def wrong_sha(ctx: Ctx) -> None:
    """A defect: model.json records another sha256."""
    meta_path = ctx.model / "anat" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta, indent=2))


def unreadable_checkpoint(ctx: Ctx) -> None:
    """A defect: model.pt is no checkpoint at all, with a matching recorded sha256."""
    (ctx.model / "anat" / "model.pt").write_bytes(b"PK\x03\x04 this is no checkpoint" * 10)
    _reseal(ctx.model / "anat")


def other_architecture(ctx: Ctx) -> None:
    """A defect: weights that do not fit the architecture the checkpoint declares."""
    def edit(payload: dict) -> None:
        meta = json.loads(payload["metadata"])
        meta["architecture"]["levels"][0]["hidden"] = 12
        payload["metadata"] = json.dumps(meta)
    _edit_payload(ctx, edit)


def other_format_version(ctx: Ctx) -> None:
    """A defect: a checkpoint format this version does not read."""
    _edit_payload(ctx, lambda payload: payload.update(format_version=99))


def drop_profile(ctx: Ctx) -> None:
    """A defect: the model was trained without T2w reference images of site ge (no such profile)."""
    from ihf_bids.harmonize.checkpoint import load_model, save_model

    (ctx.model / "anat" / "profiles" / "site-ge_modality-T2w_profile.npz").unlink()
    network, meta = load_model(ctx.model / "anat")  # re-saved: model.pt records the profiles it has
    save_model(network, ctx.model / "anat", {k: meta[k] for k in ("group", "modalities", "sites", "template")})


# --------------------------------------------------------------------------- #
# the cases
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Case:
    """One defect: how to make it, the options, the exit code and what the message must say.

    ``expect`` holds substrings of the log (``{bids}``, ``{out}``, ``{tmp}``, ``{model}`` are
    filled in): the file or option at fault and the fix.
    """

    id: str
    corrupt: Callable[[Ctx], None] | None
    code: int
    expect: tuple[str, ...]
    args: tuple[str, ...] = (SKIP,)
    bids_arg: str = "{bids}"
    out_arg: str = "{out}"
    model: bool = False
    marks: tuple = field(default_factory=tuple)


ROOT_SKIP = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
TARGET_GE = ("--target-site", "ge", "--model", "{model}", SKIP)

CASES = [
    # ---- the dataset and the paths
    Case("bids-dir-does-not-exist", None, EXIT_USAGE, ("{tmp}/nowhere is not a directory", "mounted"),
         bids_arg="{tmp}/nowhere"),
    Case("bids-dir-is-a-subfolder", None, EXIT_USAGE,
         ("{bids}/sub-01 is not a BIDS dataset", "the dataset root seems to be {bids}; give that folder as BIDS_DIR"),
         bids_arg="{bids}/sub-01"),
    Case("no-dataset-description", remove("dataset_description.json"), EXIT_USAGE,
         ("{bids} is not a BIDS dataset: it has no dataset_description.json",
          "give the dataset's root folder (the one holding dataset_description.json)")),
    Case("dataset-description-not-json", edit_text("dataset_description.json", lambda t: t[:-5]), EXIT_DATA_ERROR,
         ("{bids}/dataset_description.json cannot be read as JSON", "fix the file")),
    Case("validator-finds-missing-bval", remove(DWI_GE + ".bval"), EXIT_DATA_ERROR,
         ("{bids} is not a valid BIDS dataset", "DWI_MISSING_BVAL /" + DWI_GE + ".nii.gz",
          "Fix the dataset", "--skip-bids-validation"), args=()),
    Case("output-dir-inside-bids-dir", None, EXIT_USAGE,
         ("OUTPUT_DIR {bids}/out is inside the input dataset", "write the outputs to {bids}/derivatives/ihf-bids"),
         out_arg="{bids}/out"),
    Case("output-dir-parent-is-a-file", lambda ctx: (ctx.tmp / "a_file").write_text("x"), EXIT_USAGE,
         ("OUTPUT_DIR {tmp}/a_file/out is not writable (or cannot be created)", "choose a writable folder"),
         out_arg="{tmp}/a_file/out"),
    Case("output-dir-not-writable", read_only_parent, EXIT_USAGE,
         ("OUTPUT_DIR {tmp}/locked/out is not writable", "choose a writable folder"),
         out_arg="{tmp}/locked/out", marks=(ROOT_SKIP,)),
    Case("work-dir-inside-bids-dir", None, EXIT_USAGE,
         ("the work directory {bids}/work is inside the input dataset", "give -w/--work-dir a folder outside"),
         args=(SKIP, "-w", "{bids}/work")),
    # ---- labels
    Case("unknown-participant-label", None, EXIT_USAGE,
         ("participant label(s) 99 not found in {bids} (found: 01)",), args=(SKIP, "--participant-label", "99")),
    Case("unknown-session-label", None, EXIT_USAGE,
         ("session label(s) philips not found", "(found: ge, siemens)"), args=(SKIP, "--session-label", "philips")),
    Case("participant-label-is-a-path", None, EXIT_USAGE,
         ("participant label '../sub-01' looks like a path; give the label only",),
         args=(SKIP, "--participant-label", "../sub-01")),
    Case("session-label-is-a-path", None, EXIT_USAGE,
         ("session label 'ses-ge/anat' looks like a path; give the label only",),
         args=(SKIP, "--session-label", "ses-ge/anat")),
    # ---- sites and targets
    Case("sites-cannot-be-told", no_sites, EXIT_DATA_ERROR,
         ("cannot tell the site of sub-01_ses-ge", "{bids}/sub-01/sub-01_sessions.tsv",
          "Add the site, or choose where sites come from with --site-source")),
    Case("session-sidecars-disagree-on-site", sidecars_disagree, EXIT_DATA_ERROR,
         ("the sidecars of sub-01_ses-ge disagree on Manufacturer", "sub-01_ses-ge_T1w.nii.gz",
          "fix the sidecars, split the session"), args=(SKIP, "--site-source", "sidecar")),
    Case("unknown-target-site", None, EXIT_WORKFLOW_BUILD,
         ("the model {model} has no T1w profile for site 'philips' (sites: ge, siemens)",
          "pick one of those with --target-site"),
         args=("--target-site", "philips", "--model", "{model}", SKIP), model=True),
    Case("target-site-without-reference-images", drop_profile, EXIT_WORKFLOW_BUILD,
         ("the model {model} has no T2w profile for site 'ge' (sites: siemens)",
          "retrain with 'ihf-bids BIDS_DIR OUTPUT_DIR group --train' including that site's participants"),
         args=TARGET_GE, model=True),
    Case("target-reference-unusable", all_zero_reference, EXIT_DATA_ERROR,
         ("{tmp}/reference_T1w.nii.gz: every voxel equals 0 (the image is empty)", "Check the conversion"),
         args=("--target-reference", "{tmp}/reference_T1w.nii.gz", "--model", "{model}", SKIP), model=True),
    # ---- model checkpoints
    Case("checkpoint-corrupt", flip_byte, EXIT_WORKFLOW_BUILD,
         ("{model}/anat/model.pt does not match its recorded sha256",
          "the file is corrupt or was replaced; copy the model again"), args=TARGET_GE, model=True),
    Case("checkpoint-sha256-mismatch", wrong_sha, EXIT_WORKFLOW_BUILD,
         ("{model}/anat/model.pt does not match its recorded sha256 (expected 000000000000...",
          "copy the model again"), args=TARGET_GE, model=True),
    Case("checkpoint-unreadable", unreadable_checkpoint, EXIT_WORKFLOW_BUILD,
         ("{model}/anat/model.pt could not be read safely as a checkpoint",), args=TARGET_GE, model=True),
    Case("checkpoint-other-architecture", other_architecture, EXIT_WORKFLOW_BUILD,
         ("{model}/anat/model.pt was written for another architecture", "retrain or use a matching version"),
         args=TARGET_GE, model=True),
    Case("checkpoint-other-format-version", other_format_version, EXIT_WORKFLOW_BUILD,
         ("{model}/anat/model.pt has checkpoint format 99", "use the ihf-bids version that wrote it or retrain"),
         args=TARGET_GE, model=True),
    # ---- DWI gradients
    Case("dwi-missing-bval", remove(DWI_GE + ".bval"), EXIT_DATA_ERROR,
         ("DWI file {bids}/" + DWI_GE + ".nii.gz has no .bval file", "dcm2niix -b y", "--bids-filter-file")),
    Case("dwi-missing-bvec", remove(DWI_GE + ".bvec"), EXIT_DATA_ERROR,
         ("DWI file {bids}/" + DWI_GE + ".nii.gz has no .bvec file", "dcm2niix -b y")),
    Case("bval-count-mismatch", edit_text(DWI_GE + ".bval", drop_last), EXIT_DATA_ERROR,
         ("b-value file {bids}/" + DWI_GE + ".bval lists 45 b-values but the DWI run has 46 volumes",
          "use the .bval written with this image")),
    Case("bvec-count-mismatch", edit_text(DWI_GE + ".bvec", drop_last), EXIT_DATA_ERROR,
         ("b-vector file {bids}/" + DWI_GE + ".bvec has rows of [45] values but the DWI run has 46 volumes",
          "use the .bvec written with this image")),
    Case("bvec-not-unit", edit_text(DWI_GE + ".bvec", bvec_column(1, 0.5)), EXIT_DATA_ERROR,
         ("b-vector file {bids}/" + DWI_GE + ".bvec: volume 1 (b=1000) has a b-vector of norm 0.5",
          "fix the file")),
    Case("bvec-zero-for-b1000", edit_text(DWI_GE + ".bvec", bvec_column(1, 0.0)), EXIT_DATA_ERROR,
         ("b-vector file {bids}/" + DWI_GE + ".bvec: volume 1 (b=1000) has a b-vector of norm 0",
          "need unit b-vectors")),
    Case("dwi-too-few-directions", edit_text(DWI_GE + ".bvec", one_direction), EXIT_DATA_ERROR,
         ("b-vector file {bids}/" + DWI_GE + ".bvec: 1 distinct gradient direction(s)", "needs at least 6")),
    Case("dwi-without-b0", edit_text(DWI_GE + ".bval", no_b0), EXIT_DATA_ERROR,
         ("b-value file {bids}/" + DWI_GE + ".bval has no b=0 volume", "intensity reference")),
    # ---- image contents
    Case("t1w-4d", edit_data(T1W_GE, four_d), EXIT_DATA_ERROR,
         ("{bids}/" + T1W_GE + ": has 3 volumes", "Keep one volume (or average the repeats)")),
    Case("t1w-nan", edit_data(T1W_GE, with_nan), EXIT_DATA_ERROR,
         ("{bids}/" + T1W_GE + ": contains 1 NaN or infinite voxels", "replace them")),
    Case("dwi-inf", edit_data(DWI_GE + ".nii.gz", with_inf), EXIT_DATA_ERROR,
         ("DWI file {bids}/" + DWI_GE + ".nii.gz holds NaN or infinite values", "convert the run again")),
    Case("t1w-all-zero", edit_data(T1W_GE, np.zeros_like), EXIT_DATA_ERROR,
         ("{bids}/" + T1W_GE + ": every voxel equals 0 (the image is empty)", "Check the conversion")),
    Case("t2w-constant", edit_data(T2W_GE, lambda d: np.full_like(d, 7.0)), EXIT_DATA_ERROR,
         ("{bids}/" + T2W_GE + ": every voxel equals 7", "Check the conversion or remove the file")),
    Case("dwi-constant", edit_data(DWI_GE + ".nii.gz", lambda d: np.full_like(d, 7.0)), EXIT_DATA_ERROR,
         ("DWI file {bids}/" + DWI_GE + ".nii.gz: every voxel equals 7", "convert it again")),
    Case("t1w-truncated", truncate_gzip(T1W_GE), EXIT_DATA_ERROR,
         ("{bids}/" + T1W_GE + ": the image data cannot be read", "truncated or corrupt. Copy or convert it again")),
    Case("dwi-corrupt", garbage(DWI_GE + ".nii.gz"), EXIT_DATA_ERROR,
         ("DWI file {bids}/" + DWI_GE + ".nii.gz cannot be read", "convert the run again")),
    # ---- headers
    Case("qform-and-sform-codes-0", header_codes_zero, EXIT_DATA_ERROR,
         ("{bids}/" + T1W_GE + ": its qform and sform codes are both 0", "fix the header")),
    Case("qform-and-sform-disagree", forms_disagree, EXIT_DATA_ERROR,
         ("{bids}/" + T1W_GE + ": its qform (code 1) and sform (code 2) disagree", "up to 8 mm apart",
          "Make them agree")),
    Case("voxel-size-too-small", voxel_size(T1W_GE, 0.05), EXIT_DATA_ERROR,
         ("{bids}/" + T1W_GE + ": voxel size [0.05, 0.05, 0.05]", "Fix the voxel size in the header")),
    Case("voxel-size-too-large", voxel_size(DWI_GE + ".nii.gz", 20.0), EXIT_DATA_ERROR,
         ("{bids}/" + DWI_GE + ".nii.gz: voxel size [20.0, 20.0, 20.0]", "Fix the voxel size in the header")),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_refused_cleanly(case, clean_phantom, clean_model, tmp_path, caplog, capsys):
    """One defect, one participant run: exit code, message, inputs and outputs untouched."""
    bids = tmp_path / "bids"
    shutil.copytree(clean_phantom, bids)
    model = tmp_path / "model" / "ihf-harmony"
    if case.model:
        shutil.copytree(clean_model, model)
    ctx = Ctx(bids=bids, out=tmp_path / "out", work=tmp_path / "work", tmp=tmp_path, model=model)
    if case.corrupt is not None:
        case.corrupt(ctx)
    out = Path(ctx.fmt(case.out_arg))
    before = snapshot(bids)
    model_before = snapshot(model) if case.model else {}
    args = [ctx.fmt(a) for a in case.args]
    if "-w" not in args:
        args += ["-w", str(ctx.work)]
    code = run_cli([ctx.fmt(case.bids_arg), str(out), "participant", *args, *COMMON])
    log = caplog.text + capsys.readouterr().err

    assert code == case.code, log
    for text in case.expect:
        assert ctx.fmt(text) in log, f"{ctx.fmt(text)!r} not in the log:\n{log}"
    assert snapshot(bids) == before, "BIDS_DIR changed"
    assert not out.exists(), f"OUTPUT_DIR written: {sorted(out.rglob('*'))}"
    if case.model:
        assert snapshot(model) == model_before, "the model directory changed"
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"


# --------------------------------------------------------------------------- #
# group level: derivatives that cannot be used, a malformed --train-preset
# --------------------------------------------------------------------------- #
def _derivative(out: Path, site: str, voxel: float, *, with_site: bool = True) -> Path:
    """A preprocessed T1w of sub-01 at ``site`` on a grid of ``voxel`` mm, with its sidecar."""
    res = f"res-{voxel:g}"
    folder = out / "sub-01" / f"ses-{site}" / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"sub-01_ses-{site}_{SPACE}_{res}_desc-preproc_T1w.nii.gz"
    shape = tuple(round(n * 4 / voxel) for n in (10, 12, 10))
    data = np.random.default_rng(0).uniform(0, 1000, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([voxel, voxel, voxel, 1.0])), path)
    sidecar = {"SkullStripped": True, **({"Site": site} if with_site else {})}
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))
    return path


def no_site_tree(out: Path) -> None:
    """Derivatives whose ses-ge sidecar has no Site."""
    _derivative(out, "siemens", 4)
    _derivative(out, "ge", 4, with_site=False)


def mixed_grid_tree(out: Path) -> None:
    """Derivatives of two participant runs at 4 mm and 2 mm in one OUTPUT_DIR."""
    _derivative(out, "siemens", 4)
    _derivative(out, "ge", 2)


def preset(text: str) -> Callable[[Path], None]:
    """A ``--train-preset`` file with ``text`` beside OUTPUT_DIR."""
    def write(out: Path) -> None:
        (out.parent / "preset.toml").write_text(text)
    return write


NO_SITE = "{out}/sub-01/ses-ge/anat/sub-01_ses-ge_" + SPACE + "_res-4_desc-preproc_T1w"
GE_2MM = "{out}/sub-01/ses-ge/anat/sub-01_ses-ge_" + SPACE + "_res-2_desc-preproc_T1w.nii.gz"
SIEMENS_4MM = "{out}/sub-01/ses-siemens/anat/sub-01_ses-siemens_" + SPACE + "_res-4_desc-preproc_T1w.nii.gz"
PRESET = "--train-preset {tmp}/preset.toml"

GROUP_CASES = [
    ("group-train-sidecar-without-site", no_site_tree, ("--train",), EXIT_DATA_ERROR,
     (f"the sidecar {NO_SITE}.json of the derivative {NO_SITE}.nii.gz has no Site field",
      "Re-run the participant level for this participant")),
    ("group-sidecar-without-site", no_site_tree, (), EXIT_DATA_ERROR,
     ("the group evaluation cannot run", f"the sidecar {NO_SITE}.json", "has no Site field",
      "Re-run the participant level")),
    ("group-train-mixed-grids", mixed_grid_tree, ("--train",), EXIT_DATA_ERROR,
     (f"are on different grids: {GE_2MM} (shape (20, 24, 20), 2x2x2 mm voxels)",
      f"and {SIEMENS_4MM} (shape (10, 12, 10), 4x4x4 mm voxels)", "Use one resolution per OUTPUT_DIR")),
    ("group-mixed-grids", mixed_grid_tree, (), EXIT_DATA_ERROR,
     ("the group evaluation cannot run", f"are on different grids: {GE_2MM}", SIEMENS_4MM,
      "Use one resolution per OUTPUT_DIR")),
    ("train-preset-not-toml", preset("[train\nsteps = 2\n"), ("--train", *PRESET.split()), EXIT_USAGE,
     (f"{PRESET} is not valid TOML", "fix the file")),
    ("train-preset-wrong-type", preset("[train]\nsteps = 'two'\n"), ("--train", *PRESET.split()), EXIT_USAGE,
     (f"{PRESET}: train.steps = 'two' must be an integer of at least 1", "fix the file")),
    ("train-preset-unknown-key", preset("[train]\nstep = 2\n"), ("--train", *PRESET.split()), EXIT_USAGE,
     (f"{PRESET}: unknown training settings ['step']",)),
    ("train-preset-bad-architecture", preset("[train]\n[train.architecture]\nlevels = 3\n"),
     ("--train", *PRESET.split()), EXIT_USAGE, (f"{PRESET}: train.architecture.levels = 3 must be a non-empty list",)),
]


@pytest.mark.parametrize(("build", "args", "code", "expect"), [pytest.param(*c[1:], id=c[0]) for c in GROUP_CASES])
def test_bad_group_input_is_refused_cleanly(build, args, code, expect, clean_phantom, tmp_path, caplog):
    """Unusable derivatives or preset at the group level: exit code, message, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    build(out)
    ctx = Ctx(bids=clean_phantom, out=out, work=tmp_path / "work", tmp=tmp_path, model=tmp_path)
    bids_before, out_before = snapshot(clean_phantom), snapshot(out)
    result = run_cli([str(clean_phantom), str(out), "group", *[ctx.fmt(a) for a in args], "-w", str(ctx.work),
                      "--nprocs", "1"])
    assert result == code, caplog.text
    for text in expect:
        assert ctx.fmt(text) in caplog.text, f"{ctx.fmt(text)!r} not in the log:\n{caplog.text}"
    assert snapshot(clean_phantom) == bids_before
    after = snapshot(out)
    added = {p for p in set(after) - set(out_before) if p not in (".bidsignore", "logs")
             and not (p.startswith("logs/config-group-") and p.endswith(".json"))}
    assert not added, f"the refused group run wrote {sorted(added)}"
    assert all(after[p] == out_before[p] for p in out_before if p not in (".", "logs")), "a derivative changed"
    assert not list(tmp_path.rglob("*.tmp"))


# --------------------------------------------------------------------------- #
# accepted, with a record: orientation, a shell the target lacks
# --------------------------------------------------------------------------- #
def test_non_ras_and_oblique_images_are_conformed_and_recorded(clean_phantom, tmp_path, caplog):
    """A T1w stored ILA (axes permuted and flipped) and an oblique one: processed, orientation in the sidecar."""
    from nibabel.eulerangles import euler2mat

    from ihf_bids.phantom import read_head_motion

    bids = tmp_path / "bids"
    shutil.copytree(clean_phantom, bids)
    for site, relpath in (("siemens", T1W_SIEMENS), ("ge", T1W_GE)):  # undo the phantom's head motion: not oblique
        unmoved = np.linalg.inv(read_head_motion(bids, "01", site)) @ nib.load(bids / relpath).affine
        rewrite(bids / relpath, affine=np.round(unmoved, 4))  # the template grid, exactly
    permuted = bids / T1W_SIEMENS
    to_ila = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("ILA"))
    nib.save(nib.load(permuted).as_reoriented(to_ila), permuted)
    assert nib.aff2axcodes(nib.load(permuted).affine) == ("I", "L", "A")
    oblique = bids / T1W_GE
    rotation = np.eye(4)
    rotation[:3, :3] = euler2mat(np.deg2rad(10), np.deg2rad(5), 0)
    rewrite(oblique, affine=rotation @ nib.load(oblique).affine)
    before = snapshot(bids)
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--modalities", "T1w", SKIP, "-w", str(tmp_path / "work"),
                 *COMMON])
    assert code == 0, caplog.text
    assert snapshot(bids) == before

    def sidecar(site: str) -> dict:
        stem = f"sub-01/ses-{site}/anat/sub-01_ses-{site}_{SPACE}_res-4_desc-preproc_T1w"
        assert nib.aff2axcodes(nib.load(out / f"{stem}.nii.gz").affine) == ("R", "A", "S")
        return json.loads((out / f"{stem}.json").read_text())

    siemens, ge = sidecar("siemens"), sidecar("ge")
    assert siemens["original_orientation"] == "ILA" and siemens["reoriented"] is True
    assert siemens["oblique"] is False
    assert ge["original_orientation"] == "RAS" and ge["reoriented"] is False
    assert ge["oblique"] is True and ge["obliquity_deg"] > 5
    for meta in (siemens, ge):  # the record names no work-directory path
        assert str(tmp_path / "work") not in json.dumps(meta)
    assert not list(out.rglob("*.tmp"))


def test_a_shell_the_target_lacks_is_preprocessed_not_harmonized(clean_phantom, clean_model, tmp_path, caplog):
    """The siemens run has b=2000, the target site ge has not: exit 0, a warning, HarmonizationSkipped."""
    bids = tmp_path / "bids"
    shutil.copytree(clean_phantom, bids)
    out = tmp_path / "out"
    before = snapshot(bids)
    code = main([str(bids), str(out), "participant", "--session-label", "siemens", "--modalities", "dwi",
                 "--target-site", "ge", "--model", str(clean_model), SKIP, "-w", str(tmp_path / "work"), *COMMON])
    assert code == 0, caplog.text
    assert snapshot(bids) == before
    assert (f"{bids}/{DWI_SIEMENS}.nii.gz: the target site ge has no b2000 profile, so this run is preprocessed "
            "but not harmonized") in caplog.text
    sidecar = out / "sub-01/ses-siemens/dwi" / f"sub-01_ses-siemens_{SPACE}_res-4_desc-preproc_dwi.json"
    meta = json.loads(sidecar.read_text())
    assert meta["HarmonizationSkipped"] == "the target site ge has no profile for dwi-b2000"
    assert not list(out.rglob("*desc-harmonized*"))
    assert not list(out.rglob("*.tmp"))


# --------------------------------------------------------------------------- #
# --device cuda without a GPU
# --------------------------------------------------------------------------- #
def test_device_cuda_without_a_gpu_is_a_usage_error(clean_phantom, tmp_path):
    """With every GPU hidden, --device cuda stops at start-up (exit 2), before reading the dataset."""
    out = tmp_path / "out"
    before = snapshot(clean_phantom)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "ihf_bids.cli.run", str(clean_phantom), str(out), "participant", "--device", "cuda",
         SKIP, "-w", str(tmp_path / "work"), "--nprocs", "1"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert run.returncode == EXIT_USAGE, run.stderr
    assert "--device cuda was requested but no CUDA GPU is visible to PyTorch (CUDA_VISIBLE_DEVICES='')" in run.stderr
    assert "use --device cpu (or auto)" in run.stderr
    assert not out.exists()
    assert snapshot(clean_phantom) == before


# --------------------------------------------------------------------------- #
# the validator's scope
# --------------------------------------------------------------------------- #
def test_validator_errors_of_unselected_participants(clean_phantom, tmp_path):
    """bids-validator-deno checks the whole dataset: the message says so; with the selected labels
    (``participant_labels``), a broken participant that is not selected does not count."""
    from ihf_bids.bids.validation import validate_dataset
    from ihf_bids.errors import InputDataError

    bids = tmp_path / "bids"
    shutil.copytree(clean_phantom, bids)
    shutil.copytree(bids / "sub-01", bids / "sub-02")
    for path in sorted((bids / "sub-02").rglob("*sub-01*"), reverse=True):
        path.rename(path.with_name(path.name.replace("sub-01", "sub-02")))
    with open(bids / "participants.tsv", "a") as table:
        table.write("sub-02\t60.0\tF\tsiemens\n")
    (bids / "sub-02/ses-ge/dwi/sub-02_ses-ge_dwi.bval").unlink()
    with pytest.raises(InputDataError, match="DWI_MISSING_BVAL /sub-02/") as info:
        validate_dataset(bids)
    assert "checks the whole dataset, every participant included" in str(info.value)
    assert "--skip-bids-validation" in str(info.value)
    report = validate_dataset(bids, participant_labels=["01"])
    assert report.ok, report.format_errors()
