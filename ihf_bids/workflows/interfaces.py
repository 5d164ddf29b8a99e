"""Thin nipype interfaces around the plain functions of preproc/, harmonize/ and bids/.

Each interface calls one function and writes into its node's working directory; nipype's
cache (hashed by file content) then lets a re-run with the same work dir skip finished steps.
"""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

__all__ = [
    "ApplyTransforms",
    "CheckGradients",
    "ConformAnatomical",
    "DWIBrainMask",
    "DWIReference",
    "DerivativesSink",
    "HarmonizeDWI",
    "HarmonizeImage",
    "MaskImage",
    "N4BiasCorrection",
    "NormalizeIntensity",
    "RegisterImages",
    "ResampleDWI",
    "TemplateBrainMask",
    "TensorFit",
]


def _out(runtime, name: str) -> str:
    return os.path.join(runtime.cwd, name)


class _SingleFileInput(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="input image")


class _SingleFileOutput(TraitedSpec):
    out_file = File(exists=True, desc="output image")


class _ConformOutput(_SingleFileOutput):
    record = traits.Dict(desc="original orientation, obliquity, voxel size")


class ConformAnatomical(SimpleInterface):
    """Check an anatomical image and reorient it to RAS (:func:`~ihf_bids.preproc.anat.conform_to_ras`)."""

    input_spec = _SingleFileInput
    output_spec = _ConformOutput

    def _run_interface(self, runtime):
        from ..preproc.anat import conform_to_ras

        out = _out(runtime, "conformed.nii.gz")
        self._results["record"] = conform_to_ras(self.inputs.in_file, out)
        self._results["out_file"] = out
        return runtime


class _N4Input(_SingleFileInput):
    mask_file = File(exists=True, desc="restrict the bias estimate to this mask")


class N4BiasCorrection(SimpleInterface):
    """N4 bias-field correction (antspyx)."""

    input_spec = _N4Input
    output_spec = _SingleFileOutput

    def _run_interface(self, runtime):
        from ..preproc.anat import n4_bias_correct

        out = _out(runtime, "n4.nii.gz")
        mask = self.inputs.mask_file if isdefined(self.inputs.mask_file) else None
        n4_bias_correct(self.inputs.in_file, out, mask_file=mask)
        self._results["out_file"] = out
        return runtime


class _RegistrationOutput(TraitedSpec):
    forward_transforms = OutputMultiObject(File(exists=True), desc="moving -> fixed (ANTs order)")
    inverse_transforms = OutputMultiObject(File(exists=True), desc="fixed -> moving")
    inverse_invert = traits.List(traits.Bool, desc="flags for inverse_transforms")
    affine_file = File(exists=True, desc="the linear part (ITK .mat)")
    warp_file = File(desc="the SyN displacement field, when any")
    quality = traits.Dict(desc="{step: quality fields}, for the Registration field of sidecars")


def _registration_results(results: dict, registration, step: str) -> None:
    if registration.quality is not None:
        results["quality"] = {step: registration.quality.to_sidecar()}
    results["forward_transforms"] = list(registration.forward)
    results["inverse_transforms"] = list(registration.inverse)
    results["inverse_invert"] = list(registration.inverse_invert)
    results["affine_file"] = registration.affine
    warps = [t for t in registration.forward if t.endswith(".nii.gz")]
    if warps:
        results["warp_file"] = warps[0]


class _TemplateMaskInput(_SingleFileInput):
    voxel_size = traits.Float(1.0, usedefault=True, desc="template grid (mm)")
    mode = traits.Enum("affine", "syn", usedefault=True)
    random_seed = traits.Int(0, usedefault=True)
    step = traits.Str("T1wToTemplate", usedefault=True, desc="name of the registration in sidecars")


class _TemplateMaskOutput(_RegistrationOutput):
    mask_file = File(exists=True, desc="brain mask in the image's space")


class TemplateBrainMask(SimpleInterface):
    """Brain mask and registration to the template (:func:`~ihf_bids.preproc.anat.brain_mask_via_template`)."""

    input_spec = _TemplateMaskInput
    output_spec = _TemplateMaskOutput

    def _run_interface(self, runtime):
        from ..preproc.anat import brain_mask_via_template

        mask, registration = brain_mask_via_template(
            self.inputs.in_file, runtime.cwd, voxel_size=self.inputs.voxel_size,
            mode=self.inputs.mode, random_seed=self.inputs.random_seed,
        )
        self._results["mask_file"] = str(mask)
        _registration_results(self._results, registration, self.inputs.step)
        return runtime


class _RegisterInput(BaseInterfaceInputSpec):
    moving = File(exists=True, mandatory=True)
    fixed = File(exists=True, mandatory=True)
    moving_mask = File(exists=True)
    fixed_mask = File(exists=True)
    mode = traits.Enum("rigid", "affine", "syn", usedefault=True)
    random_seed = traits.Int(0, usedefault=True)
    start = traits.Enum("centre of mass", "scanner geometry", "rotation search", usedefault=True,
                        desc="first start (see register_images)")
    within_session = traits.Bool(False, usedefault=True,
                                 desc="bound the motion from the scanner geometry (images of one session)")
    step = traits.Str("Registration", usedefault=True, desc="name of the registration in sidecars")
    fixed_mask_margin_mm = traits.Float(0.0, usedefault=True, desc="grow the fixed mask by this margin (mm)")


class RegisterImages(SimpleInterface):
    """Mutual-information registration (:func:`~ihf_bids.preproc.registration.register_images`)."""

    input_spec = _RegisterInput
    output_spec = _RegistrationOutput

    def _run_interface(self, runtime):
        from ..preproc.registration import WITHIN_SESSION_BOUNDS, register_images

        opt = {k: getattr(self.inputs, k) for k in ("moving_mask", "fixed_mask") if isdefined(getattr(self.inputs, k))}
        registration = register_images(
            self.inputs.moving, self.inputs.fixed, runtime.cwd + os.sep, mode=self.inputs.mode,
            random_seed=self.inputs.random_seed, start=self.inputs.start,
            bounds=WITHIN_SESSION_BOUNDS if self.inputs.within_session else None,
            fixed_mask_margin_mm=self.inputs.fixed_mask_margin_mm, **opt,
        )
        _registration_results(self._results, registration, self.inputs.step)
        return runtime


class _ApplyInput(_SingleFileInput):
    reference_file = File(exists=True, mandatory=True, desc="grid of the output")
    transforms = InputMultiObject(File(exists=True), mandatory=True, desc="ANTs order (last applied first)")
    invert = traits.List(traits.Bool, desc="which transforms to invert")
    interpolation = traits.Str("linear", usedefault=True)
    mask_file = File(exists=True, desc="zero the output outside this mask (on the reference grid)")
    threshold = traits.Float(desc="binarize the output at this value")


class ApplyTransforms(SimpleInterface):
    """Resample an image onto a reference grid (:func:`~ihf_bids.preproc.registration.apply_transforms`)."""

    input_spec = _ApplyInput
    output_spec = _SingleFileOutput

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from ..preproc.registration import apply_transforms

        out = _out(runtime, "resampled.nii.gz")
        invert = self.inputs.invert if isdefined(self.inputs.invert) else None
        apply_transforms(self.inputs.in_file, self.inputs.reference_file, self.inputs.transforms, out,
                         invert=invert, interpolation=self.inputs.interpolation)
        if isdefined(self.inputs.mask_file) or isdefined(self.inputs.threshold):
            img = nib.load(out)
            data = np.asarray(img.dataobj, dtype=np.float32)
            if isdefined(self.inputs.threshold):
                data = (data > self.inputs.threshold).astype(np.uint8)
            if isdefined(self.inputs.mask_file):
                data = data * (np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0.5)
            new = nib.Nifti1Image(data, img.affine, img.header)
            new.set_data_dtype(np.uint8 if isdefined(self.inputs.threshold) else np.float32)
            nib.save(new, out)
        self._results["out_file"] = out
        return runtime


class _MaskInput(_SingleFileInput):
    mask_file = File(exists=True, mandatory=True)


class MaskImage(SimpleInterface):
    """Zero an image outside a mask on its grid (brain-only images for registration)."""

    input_spec = _MaskInput
    output_spec = _SingleFileOutput

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        img = nib.load(self.inputs.in_file)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0.5
        data = np.asarray(img.dataobj, dtype=np.float32) * mask
        out = nib.Nifti1Image(data, img.affine, img.header)
        out.set_data_dtype(np.float32)
        self._results["out_file"] = _out(runtime, "masked.nii.gz")
        nib.save(out, self._results["out_file"])
        return runtime


class _NormalizeInput(_SingleFileInput):
    mask_file = File(exists=True, mandatory=True)


class NormalizeIntensity(SimpleInterface):
    """Robust intensity normalization inside the brain (:func:`~ihf_bids.preproc.anat.normalize_intensity`)."""

    input_spec = _NormalizeInput
    output_spec = _SingleFileOutput

    def _run_interface(self, runtime):
        from ..preproc.anat import normalize_intensity

        out = _out(runtime, "normalized.nii.gz")
        normalize_intensity(self.inputs.in_file, self.inputs.mask_file, out)
        self._results["out_file"] = out
        return runtime


class _GradientsInput(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True)
    bval_file = traits.Either(None, File(), mandatory=True, desc="None when the dataset has none")
    bvec_file = traits.Either(None, File(), mandatory=True)


class _GradientsOutput(TraitedSpec):
    dwi_file = File(exists=True)
    bval_file = File(exists=True)
    bvec_file = File(exists=True)
    shells = traits.List(traits.Str)


class CheckGradients(SimpleInterface):
    """Read and check a run's gradient table (:func:`~ihf_bids.preproc.dwi.read_gradients`)."""

    input_spec = _GradientsInput
    output_spec = _GradientsOutput

    def _run_interface(self, runtime):
        from ..preproc.dwi import load_dwi, read_gradients, shell_labels, write_gradients

        _, data = load_dwi(self.inputs.dwi_file)
        bvals, bvecs = read_gradients(self.inputs.bval_file, self.inputs.bvec_file, data.shape[3])
        self._results["dwi_file"] = self.inputs.dwi_file
        self._results["bval_file"] = _out(runtime, "checked.bval")
        self._results["bvec_file"] = _out(runtime, "checked.bvec")
        write_gradients(bvals, bvecs, bval_file=self._results["bval_file"], bvec_file=self._results["bvec_file"])
        self._results["shells"] = sorted(set(shell_labels(bvals)), key=lambda s: int(s[1:]))
        return runtime


class _DWIReferenceInput(_SingleFileInput):
    bval_file = File(exists=True, mandatory=True)


class DWIReference(SimpleInterface):
    """Mean of the b=0 volumes (:func:`~ihf_bids.preproc.dwi.dwi_reference`)."""

    input_spec = _DWIReferenceInput
    output_spec = _SingleFileOutput

    def _run_interface(self, runtime):
        from ..preproc.dwi import dwi_reference

        out = _out(runtime, "b0ref.nii.gz")
        dwi_reference(self.inputs.in_file, self.inputs.bval_file, out)
        self._results["out_file"] = out
        return runtime


class DWIBrainMask(SimpleInterface):
    """Brain mask of a b=0 reference (:func:`~ihf_bids.preproc.dwi.dwi_brain_mask`)."""

    input_spec = _SingleFileInput
    output_spec = _SingleFileOutput

    def _run_interface(self, runtime):
        from ..preproc.dwi import dwi_brain_mask

        out = _out(runtime, "b0mask.nii.gz")
        dwi_brain_mask(self.inputs.in_file, out)
        self._results["out_file"] = out
        return runtime


class _ResampleDWIInput(_SingleFileInput):
    reference_file = File(exists=True, mandatory=True)
    transforms = InputMultiObject(File(exists=True), mandatory=True)
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)


class _ResampleDWIOutput(_SingleFileOutput):
    bval_file = File(exists=True)
    bvec_file = File(exists=True)


class ResampleDWI(SimpleInterface):
    """DWI onto the template grid with rotated b-vectors (:mod:`ihf_bids.preproc.dwi`)."""

    input_spec = _ResampleDWIInput
    output_spec = _ResampleDWIOutput

    def _run_interface(self, runtime):
        import shutil

        from ..preproc.dwi import resample_dwi, rotate_bvec_file

        out = _out(runtime, "dwi_template.nii.gz")
        transforms = list(self.inputs.transforms)
        resample_dwi(self.inputs.in_file, self.inputs.reference_file, transforms, out)
        # The rotation of the linear part; a SyN warp's local rotations are not applied to the vectors.
        self._results["bvec_file"] = _out(runtime, "dwi_template.bvec")
        rotate_bvec_file(self.inputs.bvec_file, self.inputs.in_file, self.inputs.reference_file, transforms,
                         self._results["bvec_file"], skip_nonlinear=True)
        self._results["out_file"] = out
        self._results["bval_file"] = _out(runtime, "dwi_template.bval")
        shutil.copyfile(self.inputs.bval_file, self._results["bval_file"])
        return runtime


class _TensorInput(_SingleFileInput):
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    wm_mask_file = File(exists=True, desc="white matter, for the summary")


class _TensorOutput(TraitedSpec):
    fa_file = File(exists=True)
    summary = traits.Dict()


class TensorFit(SimpleInterface):
    """DIPY tensor fit and FA map (:func:`~ihf_bids.preproc.tensor.fit_tensor`)."""

    input_spec = _TensorInput
    output_spec = _TensorOutput

    def _run_interface(self, runtime):
        from ..preproc.tensor import fit_tensor

        out = _out(runtime, "fa.nii.gz")
        wm = self.inputs.wm_mask_file if isdefined(self.inputs.wm_mask_file) else None
        summary = fit_tensor(self.inputs.in_file, self.inputs.bval_file, self.inputs.bvec_file,
                             self.inputs.mask_file, out, wm_mask_file=wm)
        names = {"fa_median_wm": "WhiteMatterMedianFA", "n_voxels_wm": "WhiteMatterVoxels", "fa_median": "MedianFA",
                 "fa_p90": "FA90thPercentile", "md_median": "MedianMD", "n_voxels": "BrainVoxels",
                 "n_volumes": "NumberOfVolumes"}
        self._results["fa_file"] = out
        missing = summary.pop("missing", {})
        self._results["summary"] = {names.get(k, k): float(v) for k, v in summary.items()}
        if missing:
            # Recorded as missing with the reason (JSON has no NaN; a run never fails on a summary).
            self._results["summary"].update({names.get(k, k): None for k in missing})
            self._results["summary"]["MissingSummaries"] = {names.get(k, k): why for k, why in missing.items()}
        return runtime


class _HarmonizeInput(_SingleFileInput):
    mask_file = File(exists=True, mandatory=True)
    model_dir = traits.Directory(exists=True, mandatory=True)
    modality = traits.Str(mandatory=True)
    source_site = traits.Str(mandatory=True)
    target_site = traits.Str()
    target_reference = File(exists=True)
    bval_file = File(exists=True, desc="DWI only")
    device = traits.Str("auto", usedefault=True)


class _HarmonizeOutput(_SingleFileOutput):
    provenance = traits.Dict()


class HarmonizeImage(SimpleInterface):
    """IHF-Harmony on a T1w/T2w image (:func:`~ihf_bids.harmonize.files.harmonize_image_file`)."""

    input_spec = _HarmonizeInput
    output_spec = _HarmonizeOutput

    def _run_interface(self, runtime):
        from ..harmonize.files import harmonize_image_file

        out = _out(runtime, "harmonized.nii.gz")
        self._results["provenance"] = harmonize_image_file(
            self.inputs.in_file, self.inputs.mask_file, out, model_dir=self.inputs.model_dir,
            modality=self.inputs.modality, source_site=self.inputs.source_site,
            target_site=self.inputs.target_site if isdefined(self.inputs.target_site) else None,
            target_reference=self.inputs.target_reference if isdefined(self.inputs.target_reference) else None,
            device=self.inputs.device,
        )
        self._results["out_file"] = out
        return runtime


class HarmonizeDWI(SimpleInterface):
    """IHF-Harmony on every volume of a DWI run (:func:`~ihf_bids.harmonize.files.harmonize_dwi_file`)."""

    input_spec = _HarmonizeInput
    output_spec = _HarmonizeOutput

    def _run_interface(self, runtime):
        from ..harmonize.files import harmonize_dwi_file

        out = _out(runtime, "harmonized.nii.gz")
        self._results["provenance"] = harmonize_dwi_file(
            self.inputs.in_file, self.inputs.bval_file, self.inputs.mask_file, out,
            model_dir=self.inputs.model_dir, source_site=self.inputs.source_site,
            target_site=self.inputs.target_site, device=self.inputs.device,
        )
        self._results["out_file"] = out
        return runtime


class _SinkInput(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    source_file = File(exists=True, mandatory=True, desc="the raw BIDS file it derives from")
    output_dir = traits.Directory(mandatory=True)
    bids_dir = traits.Directory(exists=True, mandatory=True)
    entities = traits.Dict(mandatory=True, desc="derivative entities: space, res, desc, suffix, extension...")
    metadata = traits.Dict(desc="sidecar fields")
    metadata_extra = traits.Dict(desc="more sidecar fields (from another node)")
    registration = InputMultiObject(traits.Dict(), desc="{step: quality} records of the registrations that placed "
                                    "the image, merged into the sidecar's Registration field")
    sources = traits.List(traits.Str, desc="extra Sources (BIDS URIs)")
    sidecar = traits.Bool(True, usedefault=True, desc="write a JSON sidecar")


class _SinkOutput(TraitedSpec):
    out_file = File(exists=True)


class DerivativesSink(SimpleInterface):
    """Copy a result into the derivatives tree under its BIDS name, atomically, with a sidecar."""

    input_spec = _SinkInput
    output_spec = _SinkOutput

    def _run_interface(self, runtime):
        from ..bids.derivatives import bids_uri, copy_atomically, derivative_path, write_sidecar

        entities = dict(self.inputs.entities)
        out = derivative_path(self.inputs.output_dir, self.inputs.source_file, **entities)
        out.parent.mkdir(parents=True, exist_ok=True)
        copy_atomically(self.inputs.in_file, out)
        if self.inputs.sidecar and entities.get("extension", ".nii.gz") in (".nii.gz", ".nii"):
            fields = {"Sources": [bids_uri(self.inputs.source_file, self.inputs.bids_dir)]}
            if isdefined(self.inputs.sources):
                fields["Sources"] += list(self.inputs.sources)
            for extra in (self.inputs.metadata, self.inputs.metadata_extra):
                if isdefined(extra):
                    fields.update(extra)
            if isdefined(self.inputs.registration) and self.inputs.registration:
                fields["Registration"] = {k: v for record in self.inputs.registration for k, v in record.items()}
            write_sidecar(str(out).rsplit(".nii", 1)[0] + ".json", fields)
        self._results["out_file"] = str(out)
        return runtime
