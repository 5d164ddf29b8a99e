"""Diffusion preprocessing: gradient checks, b=0 reference, mask, onto the template grid, FA."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nipype.pipeline.engine import Workflow

    from .base import TemplateFiles

__all__ = ["init_dwi_preproc_wf", "init_dwi_tensor_wf"]


def init_dwi_preproc_wf(
    *,
    template: TemplateFiles,
    has_anat_reference: bool,
    random_seed: int = 0,
    name: str = "dwi_preproc_wf",
) -> Workflow:
    """One DWI run onto the DWI template grid, with rotated b-vectors and a brain mask.

    The b=0 reference is registered rigidly to the subject's anatomical reference (whose
    transforms to the template are then chained), or, in a DWI-only session, affinely to
    the template T1w directly. The run is resampled once, volume by volume.

    Inputs: ``dwi_file``, ``bval_file``, ``bvec_file`` and, with an anatomical reference,
    ``ref_brain`` (its extracted brain), ``ref_mask``, ``ref_to_template``. Outputs: ``dwi``, ``bval``, ``bvec``,
    ``mask`` (template grid), ``reference`` (native b=0), ``shells``.
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
        ["dwi_file", "bval_file", "bvec_file", "ref_brain", "ref_mask", "ref_to_template"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(["dwi", "bval", "bvec", "mask", "reference", "shells"]),
                         name="outputnode")
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
    # Brain to brain: with the skull (and the neck of a T1w), the centres of mass that start
    # ANTs are centimetres apart and the rigid b=0 -> T1w registration failed on real data.
    brain = pe.Node(MaskImage(), name="extract_brain")
    wf.connect([(reference, brain, [("out_file", "in_file")]), (mask, brain, [("out_file", "mask_file")])])
    if has_anat_reference:
        register = pe.Node(RegisterImages(mode="rigid", random_seed=random_seed), name="register_to_anat")
        wf.connect([
            (inputnode, register, [("ref_brain", "fixed"), ("ref_mask", "fixed_mask")]),
            (inputnode, chain, [("ref_to_template", "in1")]),
        ])
    else:
        register = pe.Node(RegisterImages(mode="affine", random_seed=random_seed, fixed=template.dwi_t1),
                           name="register_to_template")
        chain.inputs.in1 = []
    wf.connect([
        (brain, register, [("out_file", "moving")]),
        (mask, register, [("out_file", "moving_mask")]),
        (register, chain, [("forward_transforms", "in2")]),
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
