"""Derivatives: what each session writes into the output tree (BIDS-Derivatives names).

Every file goes through :class:`~.interfaces.DerivativesSink`, which names it with
:func:`ihf_bids.bids.derivatives.derivative_path` and writes it atomically with its sidecar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import resolution_label
from ..templates import TEMPLATE_SPACE

if TYPE_CHECKING:
    from nipype.pipeline.engine import Workflow

    from ..config import RunConfig
    from .base import TemplateFiles

__all__ = ["init_anat_outputs_wf", "init_dwi_outputs_wf"]


def _resolution(voxel_size: float) -> str:
    return f"{TEMPLATE_SPACE} template grid, {voxel_size:g} mm isotropic voxels"


def _description(entities: dict) -> str:
    """The sidecar's Description of a derivative, from its entities."""
    desc, suffix = entities.get("desc"), entities.get("suffix")
    if entities.get("param") == "fa":
        return f"Fractional anisotropy of a diffusion tensor fit (DIPY, weighted least squares) of the {desc} run."
    if suffix == "mask":
        return "Brain mask on the template grid."
    if desc == "harmonized":
        return f"{suffix} harmonized to the target site with IHF-Harmony (contrast moved, anatomy kept)."
    if suffix == "dwi":
        return "DWI run resampled once onto the template grid; b-vectors rotated with the linear transform."
    return f"{suffix} bias-corrected (N4), brain-extracted and intensity-normalized, on the template grid."


def _sink(config: RunConfig, source_file: str, name: str, entities: dict, metadata: dict | None = None,
          sidecar: bool = True):
    from nipype.pipeline import engine as pe

    from .interfaces import DerivativesSink

    if sidecar:
        metadata = {"Description": _description(entities), **(metadata or {})}
    node = pe.Node(DerivativesSink(source_file=source_file, output_dir=str(config.output_dir),
                                   bids_dir=str(config.bids_dir), entities=entities, sidecar=sidecar),
                   name=name, run_without_submitting=True)
    if metadata:
        node.inputs.metadata = metadata
    return node


def init_anat_outputs_wf(
    *,
    config: RunConfig,
    modality: str,
    source_file: str,
    site: str,
    is_reference: bool,
    reference_modality: str,
    reference_uri: str | None = None,
    template: TemplateFiles,
    name: str = "anat_outputs_wf",
) -> Workflow:
    """Write a preprocessed (and, when asked, harmonized) T1w/T2w with its mask and transforms.

    ``reference_uri``: BIDS URI of the session's anatomical reference (the SpatialReference of
    native-space outputs of the other images).
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from .harmonization import init_harmonize_wf
    from .interfaces import ApplyTransforms

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface([
        "preproc", "mask", "conform_record", "affine_file", "warp_file", "from_template",
        "from_template_invert", "native", "reference_native", "reference_from_template",
        "reference_from_template_invert", "registration"]), name="inputnode")
    res = None if template.anat_resolution == 1.0 else resolution_label(template.anat_resolution)
    space = {"space": TEMPLATE_SPACE, "res": res}
    common = {"SkullStripped": True, "Site": site, "Resolution": _resolution(template.anat_resolution),
              "RegistrationToTemplate": config.registration, "RandomSeed": config.random_seed}
    preproc = _sink(config, source_file, "ds_preproc", {**space, "desc": "preproc", "suffix": modality},
                    {**common, "IntensityNormalization": "99th percentile inside the brain mask set to 1000"})
    wf.connect([(inputnode, preproc, [("preproc", "in_file"), ("conform_record", "metadata_extra"),
                                       ("registration", "registration")])])
    if not is_reference:
        # The rigid registration to the session's reference (ITK, moving -> reference).
        coreg = _sink(config, source_file, "ds_xfm_coreg",
                      {"from_": modality, "to": reference_modality, "mode": "image", "desc": "coreg",
                       "suffix": "xfm", "extension": ".mat"}, sidecar=False)
        wf.connect([(inputnode, coreg, [("affine_file", "in_file")])])
    if is_reference:
        mask = _sink(config, source_file, "ds_mask", {**space, "desc": "brain", "suffix": "mask"},
                     {"Type": "Brain", "Resolution": common["Resolution"]})
        xfm = _sink(config, source_file, "ds_xfm_affine",
                    {"from_": modality, "to": TEMPLATE_SPACE, "mode": "image", "suffix": "xfm", "extension": ".mat"},
                    sidecar=False)
        wf.connect([(inputnode, mask, [("mask", "in_file")]), (inputnode, xfm, [("affine_file", "in_file")])])
        if config.registration == "syn":
            warp = _sink(config, source_file, "ds_xfm_warp",
                         {"from_": modality, "to": TEMPLATE_SPACE, "mode": "image", "desc": "warp",
                          "suffix": "xfm", "extension": ".nii.gz"}, sidecar=False)
            wf.connect([(inputnode, warp, [("warp_file", "in_file")])])
    if not config.harmonize:
        return wf
    harmonize = init_harmonize_wf(config=config, modality=modality, source_site=site)
    harmonized = _sink(config, source_file, "ds_harmonized", {**space, "desc": "harmonized", "suffix": modality},
                       common)
    wf.connect([
        (inputnode, harmonize, [("preproc", "inputnode.in_file"), ("mask", "inputnode.mask")]),
        (harmonize, harmonized, [("outputnode.out_file", "in_file"), ("outputnode.provenance", "metadata_extra")]),
        (inputnode, harmonized, [("registration", "registration")]),
    ])
    if config.native_outputs:
        # Back to the anatomical reference's native (conformed) space.
        native = pe.Node(ApplyTransforms(interpolation="linear"), name="harmonized_to_native")
        entities = {"desc": "harmonized", "suffix": modality}
        native_meta = {"SkullStripped": True, "Site": site}
        if not is_reference:
            entities["space"] = reference_modality
            native_meta["SpatialReference"] = reference_uri
        ds_native = _sink(config, source_file, "ds_harmonized_native", entities, native_meta)
        source = "" if is_reference else "reference_"
        wf.connect([
            (harmonize, native, [("outputnode.out_file", "in_file")]),
            (inputnode, native, [(f"{source}native", "reference_file"), (f"{source}from_template", "transforms"),
                                 (f"{source}from_template_invert", "invert")]),
            (native, ds_native, [("out_file", "in_file")]),
            (harmonize, ds_native, [("outputnode.provenance", "metadata_extra")]),
        ])
    return wf


def init_dwi_outputs_wf(*, config: RunConfig, source_file: str, site: str, template: TemplateFiles,
                        missing_shells: list[str] | None = None, reference_modality: str | None = "T1w",
                        name: str = "dwi_outputs_wf") -> Workflow:
    """Write a template-space DWI run (gradients, mask, FA) and, when asked, its harmonized twin and FA.

    ``missing_shells``: b-shells of the run that the target site lacks; the run is then not
    harmonized and its sidecar says why. ``reference_modality``: the anatomical image the
    b=0 reference was registered to (``None``: the template, in a DWI-only session).
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from .dwi import init_dwi_tensor_wf
    from .harmonization import init_harmonize_wf

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(["dwi", "bval", "bvec", "mask", "affine_file", "registration"]),
                        name="inputnode")
    space = {"space": TEMPLATE_SPACE, "res": resolution_label(template.dwi_resolution)}
    common = {"SkullStripped": False, "Site": site, "Resolution": _resolution(template.dwi_resolution),
              "RandomSeed": config.random_seed}
    if missing_shells:
        common["HarmonizationSkipped"] = (f"the target site {config.target_site} has no profile for "
                                          f"{', '.join(missing_shells)}")

    def write_run(desc: str, dwi_source, prefix: str, metadata: dict):
        """Sinks of one run (image, bval, bvec) and its tensor fit; returns the sink of the FA."""
        tensor = init_dwi_tensor_wf(template=template, name=f"{prefix}_tensor_wf")
        image = _sink(config, source_file, f"ds_{prefix}_dwi", {**space, "desc": desc, "suffix": "dwi"}, metadata)
        fa = _sink(config, source_file, f"ds_{prefix}_fa",
                   {**space, "model": "tensor", "param": "fa", "desc": desc, "suffix": "dwimap"},
                   {**metadata, "SkullStripped": True, "Model": "DIPY TensorModel (WLS)"})
        wf.connect([
            (inputnode, image, [("registration", "registration")]),
            (dwi_source[0], image, [(dwi_source[1], "in_file")]),
            (dwi_source[0], tensor, [(dwi_source[1], "inputnode.dwi")]),
            (inputnode, tensor, [("bval", "inputnode.bval"), ("bvec", "inputnode.bvec"), ("mask", "inputnode.mask")]),
            (tensor, fa, [("outputnode.fa", "in_file"), ("outputnode.summary", "metadata_extra")]),
        ])
        for ext in ("bval", "bvec"):
            node = _sink(config, source_file, f"ds_{prefix}_{ext}",
                         {**space, "desc": desc, "suffix": "dwi", "extension": f".{ext}"}, sidecar=False)
            wf.connect([(inputnode, node, [(ext, "in_file")])])
        return image

    write_run("preproc", (inputnode, "dwi"), "preproc", common)
    coreg = _sink(config, source_file, "ds_xfm_coreg",
                  {"from_": "dwiref", "to": reference_modality or TEMPLATE_SPACE, "mode": "image", "desc": "coreg",
                   "suffix": "xfm", "extension": ".mat", "datatype": "dwi"}, sidecar=False)
    wf.connect([(inputnode, coreg, [("affine_file", "in_file")])])
    mask = _sink(config, source_file, "ds_mask", {**space, "desc": "brain", "suffix": "mask"},
                 {"Type": "Brain", "Resolution": common["Resolution"]})
    wf.connect([(inputnode, mask, [("mask", "in_file")])])
    if config.harmonize and config.target_site is not None and not missing_shells:
        harmonize = init_harmonize_wf(config=config, modality="dwi", source_site=site)
        wf.connect([(inputnode, harmonize, [("dwi", "inputnode.in_file"), ("mask", "inputnode.mask"),
                                            ("bval", "inputnode.bval")])])
        image = write_run("harmonized", (harmonize, "outputnode.out_file"), "harmonized", common)
        wf.connect([(harmonize, image, [("outputnode.provenance", "metadata_extra")])])
    return wf
