"""The top-level workflow: one sub-workflow per participant session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..templates import TEMPLATE_SPACE

if TYPE_CHECKING:
    from collections.abc import Sequence

    from nipype.pipeline.engine import Workflow

    from ..bids.layout import SessionInputs
    from ..config import RunConfig

__all__ = ["TemplateFiles", "init_ihf_bids_wf", "init_single_session_wf", "source_of_node", "write_template_files"]


@dataclass(frozen=True)
class TemplateFiles:
    """The template images a run needs, as files (written once into the work dir)."""

    anat_t1: str
    anat_resolution: float
    dwi_t1: str
    dwi_wm: str
    dwi_resolution: float


def write_template_files(folder: Path, *, anat_resolution: float, dwi_resolution: float) -> TemplateFiles:
    """Write the template T1w (anatomical and DWI grids) and a DWI-grid white-matter mask."""
    import numpy as np

    from ..harmonize.checkpoint import write_bytes_atomically
    from ..imageio import nifti_image
    from ..templates import load_template, template_image

    folder.mkdir(parents=True, exist_ok=True)

    def write(img, name: str) -> str:
        path = folder / name
        if not path.is_file():
            write_bytes_atomically(path, lambda handle: handle.write(img.to_bytes()))
        return str(path)

    def nii(kind: str, res: float) -> str:
        return write(template_image(kind, res), f"tpl-{TEMPLATE_SPACE}_res-{res:g}mm_{kind}.nii")

    dwi = load_template(dwi_resolution)
    wm = nifti_image(dwi.wm > 0.9, dwi.affine, np.uint8)
    return TemplateFiles(
        anat_t1=nii("t1", anat_resolution), anat_resolution=anat_resolution,
        dwi_t1=nii("t1", dwi_resolution), dwi_resolution=dwi_resolution,
        dwi_wm=write(wm, f"tpl-{TEMPLATE_SPACE}_res-{dwi_resolution:g}mm_label-WM_mask.nii"),
    )


def init_ihf_bids_wf(*, config: RunConfig, sessions: list[SessionInputs], sites: dict,
                     template: TemplateFiles) -> Workflow:
    """All selected sessions, each an independent sub-workflow."""
    from nipype.pipeline import engine as pe

    wf = pe.Workflow(name="ihf_bids_wf", base_dir=str(config.work_dir))
    for session in sessions:
        site = sites[session.subject, session.session]
        wf.add_nodes([init_single_session_wf(config=config, session=session, site=site, template=template)])
    return wf


def _session_name(session: SessionInputs) -> str:
    return f"sub_{session.subject}" + (f"_ses_{session.session}" if session.session else "") + "_wf"


def _anat_files(config: RunConfig, session: SessionInputs) -> list[tuple[str, Path]]:
    """The session's anatomical images in workflow order (``anat_<index>_<modality>_wf``)."""
    files = [("T1w", f) for f in session.t1w if "T1w" in config.modalities]
    return files + [("T2w", f) for f in session.t2w if "T2w" in config.modalities]


def source_of_node(node: str, *, config: RunConfig, sessions: Sequence[SessionInputs]) -> Path | None:
    """The input image a node of :func:`init_ihf_bids_wf` was processing, from its full name.

    Parameters
    ----------
    node : str
        nipype's dotted node name, e.g. ``ihf_bids_wf.sub_01_ses_A_wf.anat_0_T1w_wf.n4``
        (the first line of a crash report).
    config : RunConfig
        The run's configuration (selects the modalities).
    sessions : sequence of SessionInputs
        The run's sessions.

    Returns
    -------
    pathlib.Path or None
        The T1w/T2w image or DWI run, or ``None`` when the node belongs to no single input.
    """
    parts = node.split(".")
    by_name = {_session_name(s): s for s in sessions}
    session = next((by_name[p] for p in parts if p in by_name), None)
    if session is None:
        return None
    for part in parts:
        kind, _, rest = part.partition("_")
        index = rest.split("_", 1)[0]
        if kind in ("anat", "dwi") and index.isdigit():
            files = _anat_files(config, session) if kind == "anat" else [("dwi", r.nifti) for r in session.dwi]
            return files[int(index)][1] if int(index) < len(files) else None
    return None


def _missing_target_shells(config: RunConfig, run) -> list[str]:
    """Shells of a DWI run that the target site has no profile for (reported, never guessed)."""
    import logging

    import numpy as np

    from ..harmonize.model_dir import ModelDirectory
    from ..preproc.dwi import shell_labels

    if not (config.harmonize and config.target_site) or run.bval is None:
        return []
    try:
        shells = {f"dwi-{s}" for s in shell_labels(np.loadtxt(str(run.bval), ndmin=1))}
    except ValueError:
        return []  # the gradient check of the workflow reports the file
    missing = sorted(shells - set(ModelDirectory(config.model_dir).profiles(config.target_site, "dwi")))
    if missing:
        logging.getLogger("ihf_bids").warning(
            "%s: the target site %s has no %s profile, so this run is preprocessed but not harmonized "
            "(pick a target site with these shells to harmonize it)", run.nifti, config.target_site,
            ", ".join(m[len("dwi-"):] for m in missing))
    return missing


def init_single_session_wf(*, config: RunConfig, session: SessionInputs, site: str,
                           template: TemplateFiles) -> Workflow:
    """Preprocess (and harmonize) one session's T1w, T2w and DWI runs; write derivatives.

    The first T1w is the session's anatomical reference (the T2w when there is no T1w);
    DWI runs of a session without either are registered to the template directly.
    """
    from nipype.pipeline import engine as pe

    from ..bids.derivatives import bids_uri
    from .anatomical import init_anat_preproc_wf
    from .dwi import init_dwi_preproc_wf
    from .outputs import init_anat_outputs_wf, init_dwi_outputs_wf

    wf = pe.Workflow(name=_session_name(session))
    anat_files = _anat_files(config, session)
    reference = None
    for index, (modality, path) in enumerate(anat_files):
        is_reference = reference is None
        anat_wf = init_anat_preproc_wf(template=template, registration=config.registration,
                                       random_seed=config.random_seed, is_reference=is_reference,
                                       modality=modality, reference_modality=anat_files[0][0],
                                       name=f"anat_{index}_{modality}_wf")
        anat_wf.inputs.inputnode.in_file = str(path)
        if is_reference:
            reference = anat_wf
        else:
            wf.connect([(reference, anat_wf, [("outputnode.native", "inputnode.ref_native"),
                                              ("outputnode.native_mask", "inputnode.ref_mask"),
                                              ("outputnode.to_template", "inputnode.ref_to_template"),
                                              ("outputnode.registration", "inputnode.ref_registration")])])
        out_wf = init_anat_outputs_wf(config=config, modality=modality, source_file=str(path), site=site,
                                      is_reference=is_reference, reference_modality=anat_files[0][0],
                                      reference_uri=bids_uri(anat_files[0][1], config.bids_dir),
                                      template=template, name=f"anat_{index}_{modality}_outputs_wf")
        wf.connect([(anat_wf, out_wf, [(f"outputnode.{k}", f"inputnode.{k}") for k in (
            "preproc", "mask", "conform_record", "affine_file", "warp_file", "from_template",
            "from_template_invert", "native", "registration")])])
        if not is_reference:
            wf.connect([(reference, out_wf, [("outputnode.native", "inputnode.reference_native"),
                                             ("outputnode.from_template", "inputnode.reference_from_template"),
                                             ("outputnode.from_template_invert",
                                              "inputnode.reference_from_template_invert")])])
    if "dwi" not in config.modalities:
        return wf
    for index, run in enumerate(session.dwi):
        reference_modality = anat_files[0][0] if reference is not None else None
        dwi_wf = init_dwi_preproc_wf(template=template, has_anat_reference=reference is not None,
                                     reference_modality=reference_modality or "T1w",
                                     random_seed=config.random_seed, name=f"dwi_{index}_wf")
        dwi_wf.inputs.inputnode.dwi_file = str(run.nifti)
        dwi_wf.inputs.inputnode.bval_file = str(run.bval) if run.bval else None
        dwi_wf.inputs.inputnode.bvec_file = str(run.bvec) if run.bvec else None
        if reference is not None:
            wf.connect([(reference, dwi_wf, [("outputnode.native", "inputnode.ref_native"),
                                             ("outputnode.native_mask", "inputnode.ref_mask"),
                                             ("outputnode.to_template", "inputnode.ref_to_template"),
                                             ("outputnode.registration", "inputnode.ref_registration")])])
        out_wf = init_dwi_outputs_wf(config=config, source_file=str(run.nifti), site=site, template=template,
                                     missing_shells=_missing_target_shells(config, run),
                                     reference_modality=reference_modality, name=f"dwi_{index}_outputs_wf")
        wf.connect([(dwi_wf, out_wf, [(f"outputnode.{k}", f"inputnode.{k}") for k in (
            "dwi", "bval", "bvec", "mask", "affine_file", "registration")])])
    return wf
