"""Diffusion preprocessing: gradient checks, b=0 reference, mask, onto the template grid, FA."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..templates import TEMPLATE_SPACE
from .anatomical import WITHIN_SESSION_MASK_MARGIN_MM

if TYPE_CHECKING:
    from nipype.pipeline.engine import Workflow

    from .base import TemplateFiles

__all__ = ["init_dwi_preproc_wf", "init_dwi_tensor_wf"]


def init_dwi_preproc_wf(
    *,
    template: TemplateFiles,
    has_anat_reference: bool,
    reference_modality: str = "T1w",
    random_seed: int = 0,
    name: str = "dwi_preproc_wf",
) -> Workflow:
    """One DWI run onto the DWI template grid, with rotated b-vectors and a brain mask.

    The b=0 reference is registered rigidly to the session's anatomical reference (whose
    transforms to the template are then chained), starting from the scanner geometry with
    bounded motion, or, in a DWI-only session, affinely to the template T1w directly. The
    run is resampled once, volume by volume.

    Inputs: ``dwi_file``, ``bval_file``, ``bvec_file`` and, with an anatomical reference,
    ``ref_native`` (its bias-corrected image), ``ref_mask``, ``ref_to_template``,
    ``ref_registration``. Outputs: ``dwi``, ``bval``, ``bvec``, ``mask`` (template grid),
    ``reference`` (native b=0), ``shells``, ``affine_file`` (b=0 -> reference or template)
    and ``registration`` (quality records, for the sidecar).
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from .interfaces import (
        ApplyTransforms,
        CheckGradients,
        DWIBrainMask,
        DWIReference,
        MaskImage,
        RegisterImages,
        ResampleDWI,
    )

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        ["dwi_file", "bval_file", "bvec_file", "ref_native", "ref_mask", "ref_to_template", "ref_registration"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(["dwi", "bval", "bvec", "mask", "reference", "shells",
                                                "affine_file", "registration"]), name="outputnode")
    records = pe.Node(niu.Merge(2), name="registration_records")
    check = pe.Node(CheckGradients(), name="check_gradients")
    reference = pe.Node(DWIReference(), name="b0_reference")
    mask = pe.Node(DWIBrainMask(), name="b0_mask")
    chain = pe.Node(niu.Merge(2, ravel_inputs=True), name="chain_transforms")
    resample = pe.Node(ResampleDWI(reference_file=template.dwi_t1), name="resample_dwi")
    mask_to_template = pe.Node(ApplyTransforms(reference_file=template.dwi_t1, threshold=0.5),
                               name="mask_to_template")
    wf.connect([
        (inputnode, check, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (check, reference, [("dwi_file", "in_file"), ("bval_file", "bval_file")]),
        (reference, mask, [("out_file", "in_file")]),
        (check, resample, [("dwi_file", "in_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (chain, resample, [("out", "transforms")]),
        (mask, mask_to_template, [("out_file", "in_file")]),
        (chain, mask_to_template, [("out", "transforms")]),
        (resample, outputnode, [("out_file", "dwi"), ("bval_file", "bval"), ("bvec_file", "bvec")]),
        (mask_to_template, outputnode, [("out_file", "mask")]),
        (reference, outputnode, [("out_file", "reference")]),
        (check, outputnode, [("shells", "shells")]),
    ])
    if has_anat_reference:
        # The b=0 reference as it is (a brain mask of the b=0 that is off by a voxel shifts
        # the result: 1-2 mm on the phantom) onto the reference's bias-corrected image, from
        # the scanner geometry, the metric inside the reference's brain grown by a margin.
        register = pe.Node(RegisterImages(mode="rigid", random_seed=random_seed, start="scanner geometry",
                                          within_session=True, fixed_mask_margin_mm=WITHIN_SESSION_MASK_MARGIN_MM,
                                          step=f"DwiTo{reference_modality}"),
                           name="register_to_anat")
        wf.connect([
            (reference, register, [("out_file", "moving")]),
            (inputnode, register, [("ref_native", "fixed"), ("ref_mask", "fixed_mask")]),
            (inputnode, chain, [("ref_to_template", "in1")]),
            (inputnode, records, [("ref_registration", "in1")]),
        ])
    else:
        # No anatomical image: the b=0 brain onto the template T1w (the skull of the b=0 would
        # pull the centres of mass, which start the registration, apart).
        brain = pe.Node(MaskImage(), name="extract_brain")
        register = pe.Node(RegisterImages(mode="affine", random_seed=random_seed, fixed=template.dwi_t1,
                                          step=f"DwiTo{TEMPLATE_SPACE}"), name="register_to_template")
        chain.inputs.in1 = []
        records.inputs.in1 = []
        wf.connect([
            (reference, brain, [("out_file", "in_file")]), (mask, brain, [("out_file", "mask_file")]),
            (brain, register, [("out_file", "moving")]),
            (mask, register, [("out_file", "moving_mask")]),
        ])
    wf.connect([
        (register, chain, [("forward_transforms", "in2")]),
        (register, records, [("quality", "in2")]),
        (records, outputnode, [("out", "registration")]),
        (register, outputnode, [("affine_file", "affine_file")]),
    ])
    return wf


def init_dwi_tensor_wf(*, template: TemplateFiles, name: str = "dwi_tensor_wf") -> Workflow:
    """DIPY tensor fit of a template-space run; FA map and its white-matter summary.

    Inputs: ``dwi``, ``bval``, ``bvec``, ``mask``. Outputs: ``fa``, ``summary``.
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from .interfaces import TensorFit

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(["dwi", "bval", "bvec", "mask"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(["fa", "summary"]), name="outputnode")
    fit = pe.Node(TensorFit(wm_mask_file=template.dwi_wm), name="fit_tensor")
    wf.connect([
        (inputnode, fit, [("dwi", "in_file"), ("bval", "bval_file"), ("bvec", "bvec_file"), ("mask", "mask_file")]),
        (fit, outputnode, [("fa_file", "fa"), ("summary", "summary")]),
    ])
    return wf
