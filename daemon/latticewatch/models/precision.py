"""Half-precision copies of a profile's ONNX files, and how far their output is from float32.

A strongly typed TensorRT network takes each layer's precision from the ONNX it was parsed from, so an
fp16 engine needs an fp16 ONNX. `to_fp16` rewrites a float32 graph: every float32 weight and constant
becomes float16, so every layer computes in half precision, while the graph's inputs and outputs stay
float32 behind one ``Cast`` each. Callers keep passing and receiving float32 arrays.

Inputs that ONNX requires to be float32 whatever the data type (a ``Resize``'s ``roi`` and ``scales``)
are left alone. The conversion is written here on `onnx.helper` rather than taken from a converter
package: the shipped networks use a dozen operators, and the rule above is all they need.

`agreement` measures what the change costs: the largest absolute probability difference, the share of
pixels whose thresholded mask is the same, and the Dice coefficient of the two masks. The fp16 copies
of the shipped profiles were measured on the 15 real nanoparticle tiles and on simulated frames (the
numbers are in ``tests/models/test_precision.py``, which checks them against `FP16_TOLERANCE`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from latticewatch.errors import ConfigError, ModelError
from latticewatch.io.atomic import atomic_path, write_atomic
from latticewatch.models.manifest import sha256_of

if TYPE_CHECKING:  # onnx is not a runtime dependency: only compiling (the [train] or [dev] extra) needs it
    import onnx

log = logging.getLogger(__name__)

#: Bumped whenever `to_fp16` changes what it writes, so plans built from an older fp16 file are rebuilt.
FP16_FORMAT = 1

#: (operator, input index) pairs that ONNX types as float32 whatever the data's type.
_KEEP_FLOAT32 = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


@dataclass(frozen=True)
class Tolerance:
    """The least agreement a reduced-precision network must keep with float32 on the same input."""

    max_abs_diff: float  # largest |p16 - p32| over all pixels (probabilities, 0–1)
    pixels_equal: float  # share of pixels whose thresholded mask is the same
    dice: float  # Dice of the two thresholded masks (1 where both are empty)


#: What the fp16 networks must keep, with a margin over what was measured (see the module docstring).
FP16_TOLERANCE = Tolerance(max_abs_diff=0.02, pixels_equal=0.999, dice=0.999)


@dataclass(frozen=True)
class Agreement:
    """How one output compares with its float32 reference (`agreement`)."""

    max_abs_diff: float
    pixels_equal: float
    dice: float
    n_pixels: int

    def within(self, tolerance: Tolerance) -> bool:
        """Whether every measure is at least as good as ``tolerance`` asks."""
        return (self.max_abs_diff <= tolerance.max_abs_diff and self.pixels_equal >= tolerance.pixels_equal
                and self.dice >= tolerance.dice)

    def __str__(self) -> str:
        return (f"max |Δp| {self.max_abs_diff:.2e}, {100 * self.pixels_equal:.4f} % of {self.n_pixels} mask pixels "
                f"equal, Dice {self.dice:.5f}")


def agreement(reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.5) -> Agreement:
    """Compare ``candidate`` probabilities with the float32 ``reference`` (same shape).

    Examples
    --------
    >>> ref = np.array([0.1, 0.6, 0.9, 0.2], np.float32)
    >>> a = agreement(ref, ref + np.float32(0.001))
    >>> a.pixels_equal, a.dice
    (1.0, 1.0)
    >>> agreement(ref, np.array([0.1, 0.4, 0.9, 0.2], np.float32)).dice
    0.6666666666666666
    """
    reference, candidate = np.asarray(reference, np.float32), np.asarray(candidate, np.float32)
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    ref_mask, cand_mask = reference >= threshold, candidate >= threshold
    both = int(np.count_nonzero(ref_mask & cand_mask))
    total = int(np.count_nonzero(ref_mask)) + int(np.count_nonzero(cand_mask))
    return Agreement(
        max_abs_diff=float(np.max(np.abs(reference - candidate))) if reference.size else 0.0,
        pixels_equal=float(np.mean(ref_mask == cand_mask)) if reference.size else 1.0,
        dice=2 * both / total if total else 1.0,
        n_pixels=int(reference.size),
    )


def _half(tensor: onnx.TensorProto) -> onnx.TensorProto:
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    finite = np.abs(array[np.isfinite(array)])
    if finite.size and finite.max() > np.finfo(np.float16).max:
        raise ModelError(f"tensor {tensor.name!r}: a value of {finite.max():.3g} does not fit in float16")
    return numpy_helper.from_array(array.astype(np.float16), tensor.name)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the float32 ``model`` that computes in float16 with float32 inputs and outputs.

    Raises `ModelError` when a weight does not fit in float16 or the result fails the ONNX checker.

    Examples
    --------
    >>> half = to_fp16(onnx.load("plugins/latticewatch_nanoparticles/unet.onnx"))  # doctest: +SKIP
    >>> half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # doctest: +SKIP
    True
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    keep = {node.input[i] for node in graph.node for op, i in _KEEP_FLOAT32
            if node.op_type == op and i < len(node.input) and node.input[i]}
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in keep:
            graph.initializer[index].CopyFrom(_half(tensor))
    for node in graph.node:
        if node.op_type == "Cast":
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                    attribute.i = TensorProto.FLOAT16
        if node.op_type == "Constant" and node.output[0] not in keep:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                    attribute.t.CopyFrom(_half(attribute.t))
                elif attribute.name in ("value_float", "value_floats"):
                    raise ModelError(f"Constant {node.output[0]!r}: {attribute.name} cannot be made float16 "
                                     "(export it as a tensor value)")
    def boundary_casts(values, side: str) -> list:
        """Rename each float32 graph input (output) to its fp16 twin inside the graph, and cast at the edge."""
        casts = []
        for value in values:
            if value.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            half_name = f"{value.name}__fp16"
            for node in graph.node:
                names = getattr(node, side)
                names[:] = [half_name if name == value.name else name for name in names]
            if side == "input":
                casts.append(helper.make_node("Cast", [value.name], [half_name], name=f"{value.name}__to_fp16",
                                              to=TensorProto.FLOAT16))
            else:
                casts.append(helper.make_node("Cast", [half_name], [value.name], name=f"{value.name}__to_fp32",
                                              to=TensorProto.FLOAT))
        return casts

    nodes = boundary_casts(graph.input, "input") + list(graph.node) + boundary_casts(graph.output, "output")
    del graph.node[:]
    graph.node.extend(nodes)
    # intermediate types are inferred again from the new weights rather than patched one by one
    del graph.value_info[:]
    try:
        checked = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(checked, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ModelError(f"the float16 copy of {graph.name or 'the network'} is not valid ONNX: {err}") from err
    return model


def write_fp16(source: Path, destination: Path) -> Path:
    """Write the float16 copy of the ONNX file ``source`` to ``destination`` (atomically); returns it.

    Examples
    --------
    >>> write_fp16(Path("unet.onnx"), Path("plans/unet.fp16.onnx"))  # doctest: +SKIP
    PosixPath('plans/unet.fp16.onnx')
    """
    try:
        import onnx
    except ImportError as err:
        raise ConfigError(f"writing the float16 copy of {source} needs the onnx package: "
                          f"pip install 'latticewatch[compile]' ({err})") from err
    try:
        model = onnx.load(str(source))
    except Exception as err:  # onnx raises DecodeError or OSError variants with no common base
        raise ModelError(f"{source}: not a readable ONNX file: {err}") from err
    half = to_fp16(model)
    destination.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(destination, half.SerializeToString())
    log.info("wrote %s (float16 copy of %s)", destination, source)
    return destination


def quantize_int8(source: Path, calibration: Path, destination: Path) -> str:
    """Write an explicitly quantised (Q/DQ) copy of ``source`` for an INT8 TensorRT plan; returns the
    calibration set's sha256.

    The activation ranges come from ``calibration``, the ``.npz`` of ``latticewatch calibrate int8-set``
    (model-ready tiles in ``images``, preprocessed as the analyser does), which must have been made for
    this very ONNX file. NVIDIA Model Optimizer (``pip install nvidia-modelopt[onnx]``, optional) inserts
    the Q/DQ nodes; layers it leaves unquantised run in fp16.

    Examples
    --------
    >>> quantize_int8(Path("unet.onnx"), Path("int8-set.npz"), Path("plans/onnx/unet.int8.onnx"))  # doctest: +SKIP
    '5e0c…'
    """
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as err:
        raise ConfigError("--int8 needs NVIDIA Model Optimizer, which is optional: "
                          f"pip install 'nvidia-modelopt[onnx]' ({err})") from err
    import onnx

    try:
        with np.load(calibration, allow_pickle=False) as data:
            images, made_for = np.asarray(data["images"], np.float32), str(data["onnx_sha256"])
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{calibration}: not a calibration set of `latticewatch calibrate int8-set` ({err})") from err
    if made_for != sha256_of(source):
        raise ConfigError(f"{calibration}: made for an ONNX file with sha256 {made_for[:12]}…, not {source}; "
                          "make it again with `latticewatch calibrate int8-set` for this profile")
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(destination) as temporary:
        quantize(onnx_path=str(source), quantize_mode="int8", calibration_data={input_name: images},
                 calibration_method="entropy", calibration_eps=["cpu"], output_path=str(temporary),
                 high_precision_dtype="fp16")
    log.info("wrote %s (INT8 Q/DQ of %s, calibrated on %d tiles of %s)", destination, source, len(images), calibration)
    return sha256_of(calibration)
